"""Shards streamed over HTTP and pipe: (ldm.data.remote): each sample once over ranks x workers, byte-exact with
the same shards read from disk, exact mid-epoch resume, and every failure retried, then skipped and counted in
bounded time. The server is a thread of this process (tests/shard_server.py), on a free port."""
import json
import os
import subprocess
import sys
import tarfile
import time
from collections import Counter
from itertools import islice

import pytest
import torch
from shard_server import ShardServer, free_port, write_shards

from ldm.data import make_dataloader, open_dataset
from ldm.data.dataset import ImageTextDataset
from ldm.data.sources.webdataset import WebDatasetSource
from ldm.data.transforms import ImageTransform
from ldm.training.stream import BatchStream

SHARDS, PER_SHARD = 8, 6
PATTERN = "{000000..000007}.tar"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("shards"))
    keys = write_shards(root, SHARDS, PER_SHARD)
    server = ShardServer(root, stall_s=3.0)
    yield server, root, keys
    server.stop()


def epoch_keys(spec: str, world_size: int = 2, workers: int = 2, epoch: int = 0) -> Counter:
    seen = Counter()
    for rank in range(world_size):
        loader = make_dataloader(spec, batch_size=2, num_workers=workers, resolution=16, rank=rank,
                                 world_size=world_size, seed=3)
        loader.set_epoch(epoch)
        seen.update(k for batch in loader for k in batch["key"])
        assert loader.skips.total == 0, loader.skips.report()
    return seen


@pytest.mark.parametrize("pattern", [PATTERN, "{000000..000002}.tar"])  # 8 shards by shard; 3 < 4 consumers
def test_http_epoch_gives_each_key_once_over_two_ranks_and_two_workers(served, pattern):
    server, root, keys = served
    seen = epoch_keys(f"{server.url()}/{pattern}")
    expected = [k for k in keys if int(k[1:].split("_")[0]) < (8 if pattern == PATTERN else 3)]
    assert sorted(seen) == sorted(expected) and set(seen.values()) == {1}
    assert epoch_keys(f"{server.url()}/{pattern}", epoch=1) == seen  # another shard order, the same partition


def test_http_samples_equal_the_same_shards_read_from_disk(served):
    server, root, keys = served
    remote = {s["key"]: s for s in open_dataset(f"{server.url()}/{PATTERN}", resolution=16, seed=1)}
    local = {s["key"]: s for s in open_dataset(os.path.join(root, PATTERN), resolution=16, seed=1)}
    assert sorted(remote) == sorted(local) == sorted(keys)
    for key, sample in local.items():
        assert torch.equal(remote[key]["pixel_values"], sample["pixel_values"]) and \
            remote[key]["caption"] == sample["caption"] == f"a square {key}"


@pytest.mark.parametrize("stop_after", [1, 4])
def test_resume_mid_epoch_over_http_continues_where_it_stopped(served, stop_after):
    server, _, keys = served
    spec, union = f"{server.url()}/{PATTERN}", Counter()
    for rank in range(2):
        dataset = open_dataset(spec, resolution=16, rank=rank, world_size=2, seed=5)
        reference = make_dataloader(dataset, batch_size=2, num_workers=2)  # the uninterrupted epoch 0
        reference_keys = [batch["key"] for batch in reference]
        first = BatchStream(dataset, batch_size=2, rank=rank, world_size=2, seed=5, num_workers=2)
        before = [batch["key"] for batch in islice(first, stop_after)]
        position = first.position()  # what a checkpoint stores
        resumed = BatchStream(open_dataset(spec, resolution=16, rank=rank, world_size=2, seed=5), batch_size=2,
                              rank=rank, world_size=2, seed=5, num_workers=2)
        resumed.seek(position)
        after = [batch["key"] for batch in islice(resumed, len(reference_keys) - stop_after)]
        assert before + after == reference_keys  # same batches, same order: nothing repeated or skipped
        assert resumed.position() == {"epoch": 0, "batch_in_epoch": len(reference_keys)}
        union.update(k for batch in before + after for k in batch)
    assert sorted(union) == sorted(keys) and set(union.values()) == {1}


def read_all(spec: str, timeout: float = 5.0, retries: int = 2):
    """Returns (keys, skip counts, seconds) of one pass over `spec` in this process."""
    dataset = ImageTextDataset(WebDatasetSource(spec, timeout=timeout, retries=retries), ImageTransform(16),
                               shuffle=False)
    start = time.monotonic()
    keys = [s["key"] for s in dataset]
    return keys, dict(dataset.skips.counts), time.monotonic() - start


def test_connection_refused_is_retried_then_skipped_and_counted():
    keys, skips, seconds = read_all(f"http://127.0.0.1:{free_port()}/ok/{{000000..000001}}.tar", retries=2)
    assert keys == [] and skips == {"shard_unreachable": 2} and seconds < 10  # backoff 0.5 + 1 s per shard


def test_404_is_skipped_without_retries_and_the_run_ends_with_the_counts(served):
    server, _, keys = served
    spec = f"{server.url()}/{{000000,missing,000001}}.tar"
    loader = make_dataloader(spec, batch_size=2, num_workers=2, resolution=16, shuffle=False)
    seen = [k for batch in loader for k in batch["key"]]
    assert sorted(seen) == sorted(keys[: 2 * PER_SHARD])  # the good shards, whole
    assert dict(loader.skips.counts) == {"shard_http_404": 1} and "missing.tar" in loader.skips.report()
    assert server.hits[("ok", "missing.tar")] == 1


@pytest.mark.parametrize("modes", ["cut1", "cut1+norange"])  # resumed by Range, or re-read and the head dropped
def test_connection_cut_once_is_resumed_at_the_byte_reached(served, modes):
    server, _, keys = served
    found, skips, _ = read_all(f"{server.url(modes)}/000002.tar")
    assert found == keys[2 * PER_SHARD: 3 * PER_SHARD] and skips == {}  # every record once, in order
    assert server.hits[(modes, "000002.tar")] == 2


def test_connection_cut_every_time_keeps_the_complete_records_and_counts_the_rest(served):
    server, _, keys = served
    found, skips, seconds = read_all(f"{server.url('cut')}/000003.tar", retries=2)
    shard = keys[3 * PER_SHARD: 4 * PER_SHARD]
    assert 0 < len(found) < PER_SHARD and found == shard[: len(found)]
    assert skips == {"truncated_shard": 1} and server.hits[("cut", "000003.tar")] == 3 and seconds < 10


def test_a_shard_cut_off_on_the_server_is_a_truncated_shard(served):
    server, root, keys = served
    data = open(os.path.join(root, "000004.tar"), "rb").read()
    with tarfile.open(os.path.join(root, "000004.tar")) as tar:
        cut = tar.getmembers()[6].offset_data + 10  # inside the 4th record's image
    with open(os.path.join(root, "short.tar"), "wb") as f:
        f.write(data[:cut])
    found, skips, _ = read_all(f"{server.url()}/{{short,000005}}.tar")
    assert found == keys[4 * PER_SHARD: 4 * PER_SHARD + 3] + keys[5 * PER_SHARD: 6 * PER_SHARD]
    assert skips == {"truncated_shard": 1}


def test_a_stalling_server_hits_the_read_timeout_then_is_skipped(served):
    server, _, keys = served
    found, skips, seconds = read_all(f"{server.url('stall')}/{{000006,000007}}.tar", timeout=0.5, retries=1)
    assert skips == {"shard_stalled": 2} and seconds < 2 * (2 * 0.5 + 0.5) + 3  # (retries+1) x timeout + backoff
    assert len(found) < 2 * PER_SHARD and set(found) < set(keys[6 * PER_SHARD:])


def test_a_dead_shard_server_ends_training_input_with_the_counts_not_a_hang(tmp_path):
    keys = write_shards(str(tmp_path))
    server = ShardServer(str(tmp_path))
    source = WebDatasetSource(f"{server.url()}/{PATTERN}", timeout=0.5, retries=0)  # retries: tested above
    stream = BatchStream(ImageTextDataset(source, ImageTransform(16)), batch_size=2, num_workers=2)
    batches = iter(stream)
    assert set(next(batches)["key"]) < set(keys)
    server.stop()  # mid-epoch: the shards not yet fetched fail, then every shard of the next epoch
    start = time.monotonic()
    with pytest.raises(ValueError, match=r"no batch in a whole epoch \(skipped 8 samples: 8 shard_unreachable"):
        for _ in batches:
            pass
    assert stream.epoch == 1 and time.monotonic() - start < 30


def test_a_stream_stopped_mid_epoch_reports_the_skips_so_far(served):
    server, _, keys = served
    dataset = open_dataset(f"{server.url()}/{{missing,000000,000001}}.tar", resolution=16, shuffle=False)
    stream = BatchStream(dataset, batch_size=2)
    assert next(iter(stream))["key"] == keys[:2]
    skipped = stream.skipped()
    assert dict(skipped.counts) == {"shard_http_404": 1} and "missing.tar" in skipped.report()


def test_pipe_specs_stream_command_output(served, tmp_path):
    server, root, keys = served
    found, skips, _ = read_all(f"pipe:cat {root}/{PATTERN}")
    assert sorted(found) == sorted(keys) and skips == {}
    assert epoch_keys(f"pipe:cat {root}/{{000000..000003}}.tar") == Counter(keys[: 4 * PER_SHARD])


def test_a_pipe_that_fails_mid_shard_is_rerun_and_its_head_dropped(served, tmp_path):
    server, root, keys = served
    shard, marker = os.path.join(root, "000001.tar"), tmp_path / "failed-once"
    command = f"if [ -e {marker} ]; then cat {shard}; else touch {marker}; head -c 3000 {shard}; exit 1; fi"
    found, skips, _ = read_all(f"pipe:{command}")
    assert found == keys[PER_SHARD: 2 * PER_SHARD] and skips == {} and marker.exists()


def test_braces_that_are_no_pattern_stay_in_a_pipe_command():
    from ldm.data.sources.webdataset import brace_expand

    assert brace_expand("pipe:cat s/{0..1}.tar | awk '{print}'") == [
        "pipe:cat s/0.tar | awk '{print}'", "pipe:cat s/1.tar | awk '{print}'"]


def test_pipe_failures_and_stalls_are_skipped_and_counted(tmp_path):
    found, skips, seconds = read_all("pipe:echo oops >&2; exit 3", retries=1)
    assert found == [] and skips == {"pipe_failed": 1} and seconds < 5
    found, skips, seconds = read_all("pipe:sleep 30", timeout=0.3, retries=1)
    assert found == [] and skips == {"shard_stalled": 1} and seconds < 5  # the sleeps are killed, not awaited


def test_remote_specs_are_checked_before_any_read():
    with pytest.raises(ValueError, match="only webdataset .tar shards"):
        open_dataset("http://127.0.0.1:1/data.parquet")
    with pytest.raises(ValueError, match="no host"):
        open_dataset("http:///x/000000.tar")
    with pytest.raises(ValueError, match="pipe: needs a command"):
        open_dataset("pipe: ")


def test_prepare_data_packs_http_shards_into_local_ones(served, tmp_path):
    from ldm.cli import main

    server, _, keys = served
    assert main(["prepare-data", f"{server.url()}/{{000000..000001}}.tar", "--out", str(tmp_path / "local"),
                 "--format", "webdataset", "--image-format", "png"]) == 0
    captions = sorted(s["caption"] for s in open_dataset(str(tmp_path / "local"), resolution=16))
    assert captions == sorted(f"a square {key}" for key in keys[: 2 * PER_SHARD])  # records renamed NNNNNNNN


def test_ldm_train_flags_set_the_remote_read_timeout_and_retries(served):
    from ldm.cli import build_parser
    from ldm.training import train_ldm
    from ldm.training.config import config_from_args
    from ldm.training.ldm_config import TrainLDMConfig

    server, _, _ = served
    argv = ["train", "--data", f"{server.url()}/{PATTERN}", "--shard-timeout", "2.5", "--shard-retries", "0"]
    args = build_parser(argv[:1]).parse_args(argv)
    cfg = config_from_args(TrainLDMConfig, args)
    train, val = train_ldm.open_training_data(cfg, rank=0, world_size=1)
    assert (train.source.timeout, train.source.retries) == (val.source.timeout, val.source.retries) == (2.5, 0)
    with pytest.raises(ValueError, match="shard_retries"):
        TrainLDMConfig(shard_retries=-1).validate()


@pytest.mark.slow
def test_ldm_train_over_http_resumes_mid_epoch_as_if_never_stopped(served, tmp_path):
    from ldm.training import train_ldm
    from ldm.training.ldm_config import TrainLDMConfig

    server, _, _ = served

    def run(folder, **overrides):
        cfg = TrainLDMConfig(**{**dict(model="tiny", data=f"{server.url()}/{PATTERN}", resolution=16, batch_size=4,
                                       num_workers=2, max_steps=6, lr_warmup_steps=0, learning_rate=2e-3,
                                       output_dir=str(tmp_path / folder), checkpoint_every=1000, validation_every=1000,
                                       num_validation_prompts=0, val_loss_samples=4, report_to="none",
                                       use_ema=False), **overrides})
        cfg.validate()
        return train_ldm.main(cfg)

    straight = run("a", checkpoint_every=3)  # 12 batches an epoch: step 3 stops mid-epoch
    run("b", max_steps=3)
    resumed = run("b", resume="latest")
    assert list(resumed["losses"]) == [4, 5, 6]
    assert all(abs(resumed["losses"][s] - straight["losses"][s]) <= 1e-6 for s in (4, 5, 6))
    assert os.path.isfile(os.path.join(resumed["checkpoint"], "pipeline", "model_index.json"))


@pytest.mark.slow
def test_ldm_train_ends_with_the_skip_counts(served, tmp_path, capsys):
    from ldm.training import train_ldm
    from ldm.training.ldm_config import TrainLDMConfig

    server, _, _ = served
    names = ",".join([f"{i:06d}" for i in range(SHARDS)] + ["missing"])  # a 404 among the shards
    cfg = TrainLDMConfig(model="tiny", data=f"{server.url()}/{{{names}}}.tar", resolution=16, batch_size=8,
                         max_steps=7, lr_warmup_steps=0, output_dir=str(tmp_path / "run"), checkpoint_every=1000,
                         validation_every=1000, num_validation_prompts=0, val_loss_samples=4, report_to="none",
                         use_ema=False)  # 6 batches an epoch: the first epoch, with its 404, is over by step 7
    cfg.validate()
    # once in each epoch the run reached: all of the first, the start of the second (its seeded order has the 404
    # before the first batch)
    assert train_ldm.main(cfg)["skipped"] == {"shard_http_404": 2}
    assert "train_ldm: rank 0: skipped 2 samples: 2 shard_http_404" in capsys.readouterr().out


RANK_KEYS = """
import json, sys
from accelerate import Accelerator
from ldm.data import make_dataloader
accelerator = Accelerator(cpu=True)
loader = make_dataloader(sys.argv[1], batch_size=2, num_workers=2, resolution=16, seed=3,
                         rank=accelerator.process_index, world_size=accelerator.num_processes)
keys = [k for batch in loader for k in batch["key"]]
json.dump({"rank": accelerator.process_index, "keys": keys}, open(f"{sys.argv[2]}/{accelerator.process_index}.json", "w"))
"""


@pytest.mark.slow
def test_two_rank_accelerate_launch_over_http_sees_each_key_once(served, tmp_path):
    server, _, keys = served
    script = tmp_path / "rank_keys.py"
    script.write_text(RANK_KEYS)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               os.path.join(repo, "configs", "accelerate", "cpu_2proc.yaml"), "--main_process_port",
               str(free_port()), str(script), f"{server.url()}/{PATTERN}", str(tmp_path)]
    process = subprocess.Popen(command, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        out, _ = process.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, 9)
        raise
    assert process.returncode == 0, out.decode()[-3000:]
    per_rank = [json.load(open(tmp_path / f"{rank}.json"))["keys"] for rank in range(2)]
    assert all(per_rank) and Counter(per_rank[0] + per_rank[1]) == Counter(keys)


@pytest.mark.slow
def test_bench_streaming_quick_mode_prints_both_ratios():
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, os.path.join(repo, "benchmarks", "bench_streaming.py"), "--num-images", "16",
                          "--image-size", "64", "--resolution", "32", "--shards", "4", "--repeats", "1"],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    ratios = dict(line.split(": ") for line in out.stdout.strip().splitlines()[-3:])
    assert sorted(ratios) == ["ratio_http_over_disk_1_workers", "ratio_http_over_disk_2_workers",
                              "ratio_http_over_disk_transport"]
    assert all(float(v) > 0 for v in ratios.values())

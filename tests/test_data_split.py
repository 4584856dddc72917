"""Ranks x workers: every sample exactly once per epoch, whatever the number of shards."""
import io
import tarfile
from collections import Counter

import pytest
from PIL import Image

from ldm.data import make_dataloader, open_dataset

R = 8


def write_shards(folder, shards: int, per_shard: int) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (12, 12), (250, 10, 10)).save(buffer, format="PNG")
    for shard in range(shards):
        with tarfile.open(folder / f"{shard:05d}.tar", "w") as tar:
            for i in range(per_shard):
                for name, data in ((f"s{shard}-{i}.png", buffer.getvalue()), (f"s{shard}-{i}.txt", b"red")):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return str(folder / ("{00000..%05d}.tar" % (shards - 1)))


def keys_of_one_epoch(spec, world_size: int, workers: int, epoch: int, shuffle_buffer: int = 0) -> Counter:
    seen = Counter()
    for rank in range(world_size):
        loader = make_dataloader(spec, batch_size=3, num_workers=workers, resolution=R, rank=rank,
                                 world_size=world_size, seed=7, shuffle_buffer=shuffle_buffer)
        loader.set_epoch(epoch)
        per_rank = [k for batch in loader for k in batch["key"]]
        assert per_rank, f"rank {rank} got no samples"
        seen.update(per_rank)
    return seen


@pytest.mark.parametrize("shards, per_shard", [(4, 5), (3, 4)])  # by shard, and (3 < 4 consumers) by record
def test_two_ranks_two_workers_see_every_sample_once(tmp_path, shards, per_shard):
    spec = write_shards(tmp_path, shards, per_shard)
    expected = {f"s{s}-{i}" for s in range(shards) for i in range(per_shard)}
    for epoch, buffer in ((0, 0), (1, 4)):
        seen = keys_of_one_epoch(spec, world_size=2, workers=2, epoch=epoch, shuffle_buffer=buffer)
        assert set(seen) == expected and set(seen.values()) == {1}


def test_map_style_sources_split_by_index():
    seen = Counter()
    for rank in range(3):
        seen.update(s["key"] for s in open_dataset("shapes:10", resolution=R, rank=rank, world_size=3))
    assert len(seen) == 10 and set(seen.values()) == {1}


def test_epochs_reshuffle_but_keep_the_set():
    dataset = open_dataset("shapes:12", resolution=R)
    first = [s["key"] for s in dataset]
    dataset.set_epoch(1)
    second = [s["key"] for s in dataset]
    assert first != second and sorted(first) == sorted(second)


def test_bad_rank_raises():
    with pytest.raises(ValueError, match="rank"):
        open_dataset("shapes:4", rank=2, world_size=2)

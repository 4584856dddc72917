"""A dead, stopped or remote rank on real two-rank launches over gloo (CPU): kill -9 of a rank makes the other exit
within a bound, naming it, and --resume latest then continues exactly; a stopped rank is named after --ddp-timeout;
two "nodes" on localhost (configs/accelerate/cpu_2node.yaml) train end to end, and kill -9 of node 1 stops node 0
naming rank 1; DeepSpeed ZeRO-2 on two CPU ranks (deepspeed_zero2_cpu.yaml) shards the optimiser, resumes exactly
and writes a pipeline folder. The heartbeat roll call itself (ldm.training.ranks) is checked in-process against a
real TCPStore."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from datetime import timedelta

import pytest
import torch
from safetensors.torch import load_file

from ldm.training import ranks

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
TRAIN = ["train/train_ldm.py", "--model", "tiny", "--data", "shapes:64@32", "--resolution", "32", "--batch-size", "4",
         "--learning-rate", "2e-3", "--num-validation-prompts", "0", "--validation-every", "1000",
         "--checkpoints-total-limit", "0", "--report-to", "none"]
# torchrun's agent: SIGTERM to the survivors on a worker's death, SIGKILL 30 s later; ours: a 3 s roll call
KILL_BOUND_S = 30 + ranks.SILENT_AFTER_S + 10  # + slack for a machine shared with other runs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(launch_args: list[str], train_args: list[str], log) -> subprocess.Popen:
    """Starts `accelerate launch` in a session of its own (so the test can kill its whole process group)."""
    argv = [sys.executable, "-m", "accelerate.commands.launch", *launch_args, *TRAIN, *train_args]
    return subprocess.Popen(argv, cwd=REPO, env=ENV, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def kill_group(process: subprocess.Popen) -> None:
    """Kills a launcher and its ranks with SIGKILL. torchrun starts each rank in a process group of its own, so
    killing the launcher's group alone would leave its ranks training (orphans)."""
    for group in [*rank_pids(process.pid).values(), process.pid]:
        try:
            os.killpg(group, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait(timeout=30)


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.05)


def checkpoint_done(out, step: int) -> bool:
    return os.path.isfile(os.path.join(out, "checkpoints", f"checkpoint-{step:08d}", "trainer_state.json"))


def rank_pids(launcher_pid: int) -> dict[int, int]:
    """Returns {global rank: pid} of the workers the launcher (torchrun's agent, in its process) started."""
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            if ppid == launcher_pid:
                with open(f"/proc/{pid}/environ", "rb") as f:
                    env = dict(v.split(b"=", 1) for v in f.read().split(b"\0") if b"=" in v)
                found[int(env[b"RANK"])] = int(pid)
        except (OSError, KeyError, IndexError, ValueError):
            continue
    return found


def run_to_end(launch_args, train_args, log_path, timeout=300) -> str:
    with open(log_path, "w") as log:
        process = launch(launch_args, train_args, log)
        try:
            assert process.wait(timeout=timeout) == 0, open(log_path).read()[-4000:]
        finally:
            kill_group(process)
    return open(log_path).read()


def losses(out) -> dict[int, float]:
    with open(os.path.join(out, "losses.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f)}


def final_weights(out, step: int) -> dict:
    return load_file(os.path.join(out, "checkpoints", f"checkpoint-{step:08d}", "accelerate", "model.safetensors"))


TWO_RANKS = ["--config_file", "configs/accelerate/cpu_2proc.yaml"]


def kill_rank_mid_run(out, log_path, rank: int, sig, train_args, after_step=4):
    """Launches two ranks, sends `sig` to `rank` once checkpoint `after_step` is complete; returns (seconds from the
    signal to the launcher's exit, its exit code, its log)."""
    with open(log_path, "w") as log:
        process = launch(TWO_RANKS, ["--out", str(out), *train_args], log)
        try:
            wait_for(lambda: checkpoint_done(out, after_step), 240, f"checkpoint {after_step}")
            pid = rank_pids(process.pid)[rank]
            os.kill(pid, sig)
            signalled = time.monotonic()
            code = process.wait(timeout=KILL_BOUND_S + 120)
            return time.monotonic() - signalled, code, open(log_path).read()
        finally:
            kill_group(process)


@pytest.mark.slow
def test_kill_9_of_a_rank_stops_the_other_naming_it_and_resume_is_exact(tmp_path):
    steps = ["--max-steps", "40", "--checkpoint-every", "2"]
    straight = tmp_path / "straight"
    run_to_end(TWO_RANKS, ["--out", str(straight), *steps], tmp_path / "straight.log")
    killed = tmp_path / "killed"
    seconds, code, text = kill_rank_mid_run(killed, tmp_path / "killed.log", 1, signal.SIGKILL, steps)
    print(f"kill -9 of rank 1: the launcher exited {seconds:.1f} s later")
    assert code != 0 and seconds < KILL_BOUND_S, (seconds, text[-4000:])
    # torchrun's report names the dead rank and its signal; the survivor's error names it too (ldm.training.ranks)
    root_cause = text[text.index("Root Cause"):]
    assert "rank      : 1 (local_rank: 1)" in root_cause and "exitcode  : -9" in root_cause, text[-3000:]
    assert "rank 0 stops: a collective failed and rank 1 of 2 sent no heartbeat" in text, text[-3000:]
    done = sorted(int(p.split("-")[1]) for p in os.listdir(killed / "checkpoints") if not p.endswith(".tmp"))
    assert 4 <= done[-1] < 40, done  # killed mid-run: the run goes on from its last complete checkpoint
    run_to_end(TWO_RANKS, ["--out", str(killed), *steps, "--resume", "latest"], tmp_path / "resumed.log")
    resumed, reference = losses(killed), losses(straight)
    assert sorted(resumed) == list(range(done[-1] + 1, 41))
    assert max(abs(resumed[s] - reference[s]) for s in resumed) <= 1e-6
    a, b = final_weights(straight, 40), final_weights(killed, 40)
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


@pytest.mark.slow
def test_a_stopped_rank_is_named_once_the_ddp_timeout_passes(tmp_path):
    train_args = ["--max-steps", "100000", "--checkpoint-every", "2", "--ddp-timeout", "8"]
    seconds, code, text = kill_rank_mid_run(tmp_path / "run", tmp_path / "run.log", 1, signal.SIGSTOP, train_args,
                                            after_step=2)
    print(f"SIGSTOP of rank 1 with --ddp-timeout 8: the launcher exited {seconds:.1f} s later")
    # no socket closes: rank 0 waits out --ddp-timeout, names rank 1, exits; the agent then SIGKILLs rank 1 (30 s)
    assert code != 0 and 8 <= seconds < 8 + KILL_BOUND_S, (seconds, text[-4000:])
    assert "rank 0 stops: a collective failed and rank 1 of 2 sent no heartbeat" in text, text[-3000:]
    assert "relaunch with --resume latest" in text


TWO_NODES = ["--config_file", "configs/accelerate/cpu_2node.yaml"]


def node_args(machine_rank: int, port: int) -> list[str]:
    return [*TWO_NODES, "--machine_rank", str(machine_rank), "--main_process_port", str(port)]


@pytest.mark.slow
def test_two_nodes_on_localhost_train_end_to_end(tmp_path):
    port, out = free_port(), tmp_path / "two-nodes"
    logs = [open(tmp_path / f"node{n}.log", "w") for n in (0, 1)]
    nodes = [launch(node_args(n, port), ["--out", str(out), "--max-steps", "4"], logs[n]) for n in (0, 1)]
    try:
        assert [node.wait(timeout=300) for node in nodes] == [0, 0], open(tmp_path / "node0.log").read()[-4000:]
    finally:
        for node in nodes:
            kill_group(node)
    text = [open(tmp_path / f"node{n}.log").read() for n in (0, 1)]
    assert "train_ldm config (2 process(es))" in text[0] and "train_ldm config" not in text[1]  # main: node 0
    assert "[rank 0] first batch keys" in text[0] and "[rank 1] first batch keys" in text[1]
    assert os.listdir(out / "checkpoints") == ["checkpoint-00000004"]  # once, complete, no leftover .tmp
    state = json.load(open(out / "checkpoints" / "checkpoint-00000004" / "trainer_state.json"))
    assert state["step"] == 4 and len(state["data"]) == 2  # one data position per rank, one rank per node
    assert os.path.isfile(out / "checkpoints" / "checkpoint-00000004" / "pipeline" / "model_index.json")


@pytest.mark.slow
def test_kill_9_of_node_1_stops_node_0_naming_rank_1(tmp_path):
    port, out = free_port(), tmp_path / "two-nodes"
    logs = [open(tmp_path / f"node{n}.log", "w") for n in (0, 1)]
    train_args = ["--out", str(out), "--max-steps", "100000", "--checkpoint-every", "2"]
    nodes = [launch(node_args(n, port), train_args, logs[n]) for n in (0, 1)]
    try:
        wait_for(lambda: checkpoint_done(out, 2), 240, "checkpoint 2")
        kill_group(nodes[1])  # node 1 dies whole: its launcher and its rank
        killed = time.monotonic()
        code = nodes[0].wait(timeout=KILL_BOUND_S + 120)
        seconds = time.monotonic() - killed
    finally:
        for node in nodes:
            kill_group(node)
    text = open(tmp_path / "node0.log").read()
    print(f"kill -9 of node 1: node 0's launcher exited {seconds:.1f} s later")
    assert code != 0 and seconds < KILL_BOUND_S, (seconds, text[-4000:])
    assert "rank 0 stops: a collective failed and rank 1 of 2 sent no heartbeat" in text, text[-3000:]
    assert "checkpoint-0000000" in text.split("rank 0 stops:")[1].split("\n")[0]  # where to resume from


def test_roll_call_names_the_rank_whose_heartbeat_stopped(monkeypatch):
    """Two heartbeats on a real TCPStore: while both beat no rank is named; once rank 1 stops, it is."""
    monkeypatch.setattr(ranks, "BEAT_S", 0.05)
    port = free_port()
    master = torch.distributed.TCPStore("127.0.0.1", port, is_master=True, timeout=timedelta(seconds=5))
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    with ranks.Heartbeat(0) as zero, ranks.Heartbeat(1):
        assert ranks.silent_ranks(zero.store, 2, wait_s=0.5) == []
    with ranks.Heartbeat(0) as zero:
        assert ranks.silent_ranks(zero.store, 2, wait_s=0.5) == [1]
        assert ranks.silent_ranks(zero.store, 3, wait_s=0.5) == [1, 2]  # rank 2 never beat
    master.set("kept", "alive")  # the store outlived both heartbeats


def test_lost_message_names_ranks_and_the_checkpoint():
    text = ranks.lost_message(0, 4, [1, 3], 3.0, "/runs/x/checkpoints/checkpoint-00000010")
    assert text == ("rank 0 stops: a collective failed and ranks 1, 3 of 4 sent no heartbeat for 3 s: dead (killed, "
                    "out of memory, its machine gone) or stopped; the last complete checkpoint is "
                    "/runs/x/checkpoints/checkpoint-00000010; relaunch with --resume latest")
    assert "node 0 is gone" in ranks.lost_message(1, 2, None, 3.0, None)
    assert "relaunch from the start" in ranks.lost_message(1, 2, [0], 3.0, None)


@pytest.mark.parametrize("seconds", [600, 7.5])
def test_the_collective_timeout_reaches_init_process_group_even_at_accelerates_default(seconds):
    assert ranks.collective_timeout(seconds).to_kwargs() == {"timeout": timedelta(seconds=seconds)}
    assert ranks.collective_timeout(seconds, "gloo").to_kwargs() == {"timeout": timedelta(seconds=seconds),
                                                                      "backend": "gloo"}
    assert ranks.collective_timeout(0, "gloo").to_kwargs() == {"backend": "gloo"}
    assert ranks.collective_timeout(0) is None  # torch's default timeout, Accelerate's backend: nothing to pass


ZERO2 = ["--config_file", "configs/accelerate/deepspeed_zero2_cpu.yaml"]


@pytest.mark.slow
def test_deepspeed_zero2_on_two_cpu_ranks_shards_the_optimizer_and_resumes_exactly(tmp_path, monkeypatch):
    monkeypatch.setitem(ENV, "DS_ACCELERATOR", "cpu")  # DeepSpeed's CPU accelerator (it would look for CUDA)
    steps = ["--checkpoint-every", "3", "--use-ema", "false"]
    straight, resumed_out = tmp_path / "straight", tmp_path / "resumed"
    text = run_to_end(ZERO2, ["--out", str(straight), "--max-steps", "6", *steps], tmp_path / "straight.log", 600)
    assert "train_ldm config (2 process(es))" in text and "DeepSpeed: the non-finite-loss guard" in text
    state = straight / "checkpoints" / "checkpoint-00000006" / "accelerate" / "pytorch_model"
    assert sorted(os.listdir(state)) == ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                                         "zero_pp_rank_1_mp_rank_00_optim_states.pt"]  # ZeRO: one shard per rank
    from_three = str(straight / "checkpoints" / "checkpoint-00000003")  # a second run continues the first's
    run_to_end(ZERO2, ["--out", str(resumed_out), "--max-steps", "6", *steps, "--resume", from_three], tmp_path / "res.log")
    resumed, reference = losses(resumed_out), losses(straight)
    assert sorted(resumed) == [4, 5, 6] and sorted(reference) == [1, 2, 3, 4, 5, 6]
    assert max(abs(resumed[s] - reference[s]) for s in resumed) <= 1e-6
    pipeline = os.path.join("checkpoints", "checkpoint-00000006", "pipeline")
    unet = os.path.join(pipeline, "unet", "diffusion_pytorch_model.safetensors")
    a, b = load_file(straight / unet), load_file(resumed_out / unet)  # the trained weights (no EMA), gathered by rank 0
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    from diffusers import DiffusionPipeline

    DiffusionPipeline.from_pretrained(str(straight / pipeline))  # a whole folder diffusers opens

"""Smoke tests: each benchmark runs end to end with one tiny repetition, so none can rot. No timing asserts."""
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_benchmark(name: str, *args: str) -> str:
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", name), *args], capture_output=True,
                         text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


@pytest.mark.slow
def test_bench_pipeline_smoke(tmp_path):
    stdout = run_benchmark("bench_pipeline.py", "--preset", "tiny", "--repeats", "1", "--warmup", "0",
                           "--steps", "2", "--json", str(tmp_path / "r.json"))
    ratios = dict(line.split(": ") for line in stdout.strip().splitlines()[-3:])
    assert set(ratios) == {"ratio_end_to_end_tiny", "ratio_end_to_end_paired_tiny", "ratio_pipeline_own_tiny"}
    assert all(float(v) > 0 for v in ratios.values())
    assert (tmp_path / "r.json").exists()


def test_bench_pipeline_pair_shares_the_modules_and_only_the_pipelines_differ(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        from bench_pipeline import load_pair
    finally:
        sys.path.pop(0)
    ours, theirs = load_pair("tiny", str(tmp_path), "cpu", torch.float32, compile_unet=False)
    assert type(ours).__module__.startswith("ldm") and type(theirs).__name__ == "StableDiffusionPipeline"
    for name in ("unet", "vae", "text_encoder", "tokenizer"):
        assert getattr(ours, name) is getattr(theirs, name)
    assert ours.scheduler is not theirs.scheduler and dict(ours.scheduler.config) == dict(theirs.scheduler.config)


@pytest.mark.slow
def test_bench_data_smoke():
    stdout = run_benchmark("bench_data.py", "--num-images", "8", "--resolution", "32", "--workers", "1",
                           "--batch-size", "4", "--vae-preset", "tiny", "--cache-images", "4")
    assert "samples/s" in stdout or "samples per second" in stdout, stdout


@pytest.mark.slow
def test_bench_train_smoke(tmp_path):
    stdout = run_benchmark("bench_train.py", "--preset", "tiny", "--resolution", "32", "--batch-size", "2",
                           "--steps", "1", "--warmup", "0", "--json", str(tmp_path / "t.json"))
    lines = stdout.strip().splitlines()
    assert lines[-4].startswith("ratio_ours_over_reference_tiny: ") and "ratio_cache_speedup_tiny" in stdout
    assert (tmp_path / "t.json").exists()


@pytest.mark.slow
def test_bench_train_times_only_the_variants_asked_for():
    stdout = run_benchmark("bench_train.py", "--preset", "tiny", "--resolution", "32", "--batch-size", "2",
                           "--steps", "1", "--warmup", "0", "--variants", "ours", "ours_cached")
    ratios = [line for line in stdout.strip().splitlines() if line.startswith("ratio_")]
    assert ratios == [ratios[0]] and ratios[0].startswith("ratio_cache_speedup_tiny: "), stdout
    assert "reference" not in stdout and "checkpointing" not in stdout, stdout


@pytest.mark.slow
def test_compare_timestep_sampling_smoke(tmp_path):
    stdout = run_benchmark("compare_timestep_sampling.py", "--seeds", "0", "--vae-steps", "5", "--ldm-steps", "5",
                           "--num-prompts", "2", "--out", str(tmp_path))
    rows = [line for line in stdout.splitlines() if " seed 0: val_loss " in line]
    assert [r.split()[0] for r in rows] == ["uniform", "logit_normal"], stdout
    assert (tmp_path / "results.json").exists()
    for mode in ("uniform", "logit_normal"):  # each run trained with its own timestep sampling
        assert f"timestep_sampling: {mode}\n" in (tmp_path / f"{mode}_0" / "ldm_run" / "config.yaml").read_text()


@pytest.mark.slow
def test_compare_objectives_smoke(tmp_path):
    import json

    stdout = run_benchmark("compare_objectives.py", "--quick", "--out", str(tmp_path))
    objectives = {"epsilon": ("epsilon", "false"), "v": ("v_prediction", "false"),
                  "v_zero_snr": ("v_prediction", "true"), "flow": ("flow", "false")}
    for dataset in ("shapes", "digits"):
        rows = [line.split(" | ")[1:3] for line in stdout.splitlines() if line.startswith(f"| {dataset} | ")]
        assert [r[0] for r in rows[:4]] == list(objectives) and ["flow", "euler"] in rows, stdout
        assert len(list((tmp_path / "seed0" / dataset).glob("**/vae_run"))) == 1  # one VAE per data set, shared
        for name, (prediction_type, zero_snr) in objectives.items():  # only the objective differs
            config = (tmp_path / "seed0" / dataset / name / "ldm_run" / "config.yaml").read_text()
            assert f"prediction_type: {prediction_type}\n" in config and f"zero_terminal_snr: {zero_snr}\n" in config
        assert (tmp_path / f"drift_{dataset}.png").exists()
    results = json.loads((tmp_path / "results.json").read_text())
    digits = results["runs"]["0"]["digits"]
    assert digits["ceiling"]["test_8x8"] > 0.9 and len(digits["prompts"]) == 10
    flow_rows = digits["objectives"]["flow"]["rows"]
    assert {r["sampler"] for r in flow_rows} == {"euler"} and {r["steps"] for r in flow_rows} == {2, 3}
    assert len(flow_rows[0]["drift"]["mean"]) == 2 + 1  # x_T and the latents entering the 2nd step, then the end
    assert (tmp_path / "adherence.png").exists() and (tmp_path / "val_loss.png").exists()


@pytest.mark.slow
def test_count_syncs_runs_and_ours_reads_no_more_tensor_values_than_diffusers_but_the_nan_guard():
    """CUDA sync counts are 0 on a CPU by construction, so the CPU run checks what it can: the host reads of tensor
    values (each a sync on a GPU), ours against diffusers' pipeline on the same model and scheduler."""
    stdout = run_benchmark("count_syncs.py", "--device", "cpu", "--steps", "3", "--schedulers", "ddim", "lms", "euler")
    rows = dict(line.split(": ", 1) for line in stdout.splitlines() if line.startswith("host_reads_"))
    assert set(rows) == {"host_reads_ddim", "host_reads_lms", "host_reads_euler"}, stdout
    for name, row in rows.items():
        _, ours, _, theirs = row.split()
        # + 1: our NaN guard reads its per-step flags once per call, after the loop (pipelines/checks.py)
        assert int(ours) <= int(theirs) + 1, f"{name}: ours reads {ours} tensor values, diffusers {theirs}"
    assert any(line.startswith("syncs_ddim: ours ") for line in stdout.splitlines()), stdout


def test_count_host_reads_counts_each_read():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        from count_syncs import count_host_reads
    finally:
        sys.path.pop(0)
    x = torch.arange(6.0)

    def three_reads_and_a_nonzero(**_):
        float(x.sum()), x[1].item(), bool(x[2] > 0), (x > 2).nonzero()
        return x * 2  # arithmetic alone reads nothing

    assert count_host_reads(three_reads_and_a_nonzero, {}) == 4


@pytest.mark.slow
def test_compare_backbones_smoke(tmp_path):
    import json

    stdout = run_benchmark("compare_backbones.py", "--quick", "--datasets", "shapes", "--arms", "unet", "dit",
                           "dit-in-context", "--out", str(tmp_path))
    results = json.loads((tmp_path / "results.json").read_text())
    costs, arms = results["costs"], results["runs"]["0"]["shapes"]["arms"]
    assert set(costs) == {"small", "dit-small", "dit-small-in-context"} and set(arms) == {"unet", "dit", "dit-in-context"}
    assert all(c["train_flops"] > 0 and c["seconds_per_step"] > 0 for c in costs.values())
    unet_seconds = arms["unet"]["steps"] * costs["small"]["seconds_per_step"]
    for arm, preset in (("dit", "dit-small"), ("dit-in-context", "dit-small-in-context")):  # equal compute time
        config = (tmp_path / "seed0" / "shapes" / arm / "ldm_run" / "config.yaml").read_text()
        assert f"model: {preset}\n" in config
        steps = arms[arm]["steps"]
        assert steps == max(3, round(unet_seconds / costs[preset]["seconds_per_step"]))
        assert [r["step"] for r in arms[arm]["rows"]][-1] == steps  # the last checkpoint is graded
    assert results["runs"]["0"]["shapes"]["held_out_images"] == 256  # the validation loss is on unseen scenes
    assert "| `dit-small` | 1,185,124 |" in stdout and (tmp_path / "backbones_shapes.png").exists()
    assert (tmp_path / "mechanisms_shapes.png").exists()


@pytest.mark.slow
def test_bench_dit_smoke():
    stdout = run_benchmark("bench_dit.py", "--preset", "dit-tiny", "--device", "cpu", "--batch-size", "2",
                           "--sample-batch", "1", "--steps", "1", "--warmup", "0", "--precision", "fp32")
    lines = dict(line.split(": ") for line in stdout.strip().splitlines()[-6:])
    assert float(lines["ratio_train_ours_vs_diffusers_dit"]) > 0 and float(lines["sampling_steps_per_s"]) > 0
    assert lines["mfu_ours"] == "n/a"  # no peak is known for a CPU


@pytest.mark.slow
def test_finetune_variants_report_smoke(tmp_path):
    import json

    from ldm import Pipeline
    from ldm.models.presets import build_components

    Pipeline(**build_components("tiny")).save_pretrained(tmp_path / "base")
    run_benchmark("finetune_variants_report.py", "--model", str(tmp_path / "base"), "--steps", "2", "--seeds", "0",
                  "--work", str(tmp_path / "work"), "--results", str(tmp_path / "results"),
                  "--figures", str(tmp_path / "figures"))
    report = json.loads((tmp_path / "results" / "report.json").read_text())
    runs = [r["run"] for r in report["summary"]]
    assert runs == ["lora", "locon", "loha", "lokr", "dora", "framed, unmasked", "framed, masked"]
    sizes = {r["run"]: r["kohya_file_kb"] for r in report["summary"]}
    assert sizes["loha"] > sizes["locon"] > sizes["lora"] > 0  # more adapted layers and factors, larger files
    assert (tmp_path / "figures" / "table.png").exists() and (tmp_path / "figures" / "samples.png").exists()

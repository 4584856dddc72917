"""The README is the front door: at most 20 KB, and every command in its ```bash blocks is run, here or by .ci/run.

Each command is either run by .ci/run (install, tests, the docs build: checked by reading .ci/run) or has a rule
in `plan()` saying how this file runs it; a command with neither fails `test_every_readme_command_is_covered`.
The slow test runs them all, in README order, in a temporary folder, with the step-limiting flags `plan()` adds.
"""
import os
import re
import shlex
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
CI = ROOT / ".ci" / "run"
MAX_README_BYTES = 20 * 1024

# Flags appended so that the slow test runs each long command in seconds; argparse keeps the last value given.
TINY_DEMO = ("--num_samples 32 --vae_steps 3 --vae_batch_size 8 --ldm_steps 3 --ldm_batch_size 8 --num_prompts 2 "
             "--num_pair_prompts 2 --sample_steps 2 --minutes 30 --threads 1")
TINY_TRAINING = "--max_steps 2"
SERVERS = ("ldm ui", "mkdocs serve")  # run until they print their URL, which must then answer
LOCAL_URL = r"http://(?:127\.0\.0\.1|localhost)[^\s'\"<>)\x1b]*"  # the server's own, not a banner's link


def code_blocks(text: str, language: str) -> list[str]:
    """Returns the bodies of the ```language blocks of a Markdown text, in order."""
    return re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.S | re.M)


def readme_commands(text: str | None = None) -> list[str]:
    """Returns the README's shell commands: continuation lines joined, comments and blank lines dropped."""
    commands = []
    for block in code_blocks(README.read_text() if text is None else text, "bash"):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words:
                commands.extend(" ".join(shlex.quote(w) for w in part) for part in split_and(words))
    return commands


def split_and(words: list[str]) -> list[list[str]]:
    """Splits `a && b` into its commands."""
    parts, current = [], []
    for w in words:
        if w == "&&":
            parts.append(current)
            current = []
        else:
            current.append(w)
    return parts + [current]


def ci_commands() -> list[list[str]]:
    """Returns .ci/run's commands as word lists (its pip lines' --progress-bar off dropped)."""
    out = []
    for line in CI.read_text().replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        for part in split_and(words):
            if part:
                out.append([w for w in part if w not in ("--progress-bar", "off")])
    return out


def run_by_ci(command: str) -> bool:
    """True when .ci/run runs this command (the same words; a mktemp output folder stands for any -d folder)."""
    words = shlex.split(command)
    if words[:2] == ["mkdocs", "build"]:
        words = [w for i, w in enumerate(words) if w != "-d" and (i == 0 or words[i - 1] != "-d")]
        return any(c[:2] == ["mkdocs", "build"] and [w for i, w in enumerate(c) if w != "-d" and c[i - 1] != "-d"]
                   == words for c in ci_commands())
    return any(same_command(words, c) for c in ci_commands())


# Report-only pytest options .ci/run may add to a README command (they change what is printed, not what runs)
REPORT_OPTIONS = re.compile(r"--durations(-min)?=\S+|--tb=\S+|-r\w+|--junitxml=\S+|--color=\S+")


def same_command(readme: list[str], ci: list[str]) -> bool:
    """True when the .ci/run words are the README's, plus report-only options at most."""
    return [w for w in ci if not REPORT_OPTIONS.fullmatch(w)] == readme


def plan(command: str) -> str:
    """Returns the command as the slow test runs it (step limits added); fails for a command nothing runs."""
    words = shlex.split(command)
    if words[:2] == ["ldm", "demo"]:
        return f"{command} {TINY_DEMO}"
    if words[:2] in (["ldm", "train"], ["ldm", "train-vae"], ["ldm", "finetune"]):
        return re.sub(r"checkpoint-\d{8}", "checkpoint-00000002", f"{command} {TINY_TRAINING}")
    if words[:2] == ["ldm", "generate"]:
        return re.sub(r"checkpoint-\d{8}", "checkpoint-00000002", command)  # the shortened run's checkpoint
    if words[:2] in (["ldm", "diagnose"], ["ldm", "convert"], ["python", "-c"], ["accelerate", "launch"]) \
            or " ".join(words[:2]) in SERVERS:
        return command
    raise AssertionError(f"README command {command!r} is run neither by .ci/run nor by tests/test_readme.py: "
                         "add a rule to plan() (and run it in test_readme_commands_run) or drop it from the README")


def test_readme_is_at_most_20_kb():
    size = README.stat().st_size
    assert size <= MAX_README_BYTES, f"README.md is {size} bytes; move detail into docs/src (limit {MAX_README_BYTES})"


def test_readme_commands_are_found():
    text = "```bash\nldm a --x 1 \\\n    --y 2   # note\n# only a comment\npython3 -m venv .venv && . .venv/bin/activate\n```\n"
    assert readme_commands(text) == ["ldm a --x 1 --y 2", "python3 -m venv .venv", ". .venv/bin/activate"]
    assert len(readme_commands()) >= 12


def test_every_readme_command_is_covered():
    for command in readme_commands():
        if not run_by_ci(command):
            plan(command)


def test_a_command_nothing_runs_fails_the_check():
    with pytest.raises(AssertionError, match="run neither"):
        plan("ldm merge-lora --model a --lora b --out c")
    assert not run_by_ci("pip install -e .")
    assert same_command(["pytest", "-q"], ["pytest", "-q", "--durations=25"])
    assert not same_command(["pytest", "-q"], ["pytest", "-q", "--runslow", "-m", "slow"])


def test_ci_runs_the_readme_install_test_and_docs_commands():
    commands = readme_commands()
    for must in ('pip install -c configs/constraints.txt -e ".[dev]"', "HF_HUB_OFFLINE=1 python -m pytest -q",
                 "HF_HUB_OFFLINE=1 python -m pytest -q --runslow -m slow", "mkdocs build --strict -f docs/mkdocs.yml"):
        readme = [c for c in commands if shlex.split(c)[:len(shlex.split(must))] == shlex.split(must)]
        assert readme, f"the README should show {must!r}"
        assert all(run_by_ci(c) for c in readme), f".ci/run should run the README's {readme}"


def serve_and_fetch(command: str, cwd: Path, env: dict) -> str:
    """Starts a server command, waits for the first http URL it prints, fetches it; returns the page."""
    process = subprocess.Popen(command, shell=True, cwd=cwd, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    urls, lines = [], []

    def read():
        for line in process.stdout:
            lines.append(line)
            urls.extend(re.findall(LOCAL_URL, line)[:1])

    threading.Thread(target=read, daemon=True).start()
    try:
        deadline = time.time() + 180
        while not urls and process.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert urls, f"{command!r} printed no URL:\n{''.join(lines)}"
        for _ in range(50):
            try:
                with urllib.request.urlopen(urls[0].rstrip(".,;"), timeout=30) as r:
                    return r.read().decode()
            except OSError:
                time.sleep(0.2)
        raise AssertionError(f"{urls[0]} did not answer:\n{''.join(lines)}")
    finally:
        os.killpg(process.pid, 15)
        process.wait(timeout=30)


@pytest.mark.slow
def test_readme_commands_run(tmp_path):
    """Runs every README command that .ci/run does not, in order, then the README's Python blocks."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    (tmp_path / "docs").symlink_to(ROOT / "docs")  # `mkdocs serve -f docs/mkdocs.yml` runs from the repository root
    for folder in ("benchmarks", "configs", "train"):  # accelerate launch --config_file configs/... train/...
        (tmp_path / folder).symlink_to(ROOT / folder)
    ran = []
    for command in readme_commands():
        if run_by_ci(command):
            continue
        planned = plan(command)
        if any(planned.startswith(s) for s in SERVERS):
            page = serve_and_fetch(planned, tmp_path, env)
            assert "<html" in page.lower(), f"{command!r} served no page"
        else:
            result = subprocess.run(planned, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True)
            assert result.returncode == 0, f"{planned!r} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        ran.append(shlex.split(command)[:2])
    assert ["ldm", "demo"] in ran and ["ldm", "finetune"] in ran and ["ldm", "ui"] in ran
    for block in code_blocks(README.read_text(), "python"):
        result = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, env=env, capture_output=True, text=True)
        assert result.returncode == 0, f"README Python block failed:\n{block}\n{result.stderr[-3000:]}"
    assert len(list((tmp_path / "outputs").glob("*.png"))) >= 8  # the README's generate commands wrote their PNGs
    assert (tmp_path / "diag").is_dir() and (tmp_path / "runs" / "my-art" / "pytorch_lora_weights.safetensors").exists()

"""One import namespace: every package folder is listed in pyproject.toml, and a user's data/ cannot shadow ours."""
import os
import subprocess
import sys
import tomllib

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_package_folder_is_listed():
    config = tomllib.load(open(os.path.join(ROOT, "pyproject.toml"), "rb"))["tool"]["setuptools"]
    listed, dirs = set(config["packages"]), config["package-dir"]
    found = set()
    for package, folder in dirs.items():
        for here, _, files in os.walk(os.path.join(ROOT, folder)):
            if "__init__.py" in files and "__pycache__" not in here:
                rel = os.path.relpath(here, os.path.join(ROOT, folder))
                found.add(package if rel == "." else package + "." + rel.replace(os.sep, "."))
    assert found == listed, f"add to / remove from pyproject packages: {sorted(found ^ listed)}"


def test_no_source_file_is_ignored_by_git():
    # a .gitignore line such as `models/` (meant for users' model folders) once hid ldm/models/ from commits:
    # the working tree passed, a fresh clone would not have
    sources = [os.path.join(here, name) for top in ("ldm", "pipelines", "data", "train", "benchmarks", "tests")
               for here, _, files in os.walk(os.path.join(ROOT, top)) if "__pycache__" not in here
               for name in files if name.endswith((".py", ".md", ".json"))]
    done = subprocess.run(["git", "check-ignore", "--no-index", *sources], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode in (0, 1), done.stderr  # 1: nothing ignored; 128: not a git checkout (an error)
    assert done.stdout == "", f"ignored by .gitignore, so missing from a fresh clone: {done.stdout}"


@pytest.mark.slow
def test_users_data_folder_does_not_shadow_ldm_data(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "__init__.py").write_text("raise SystemExit('shadowed')\n")
    code = "import ldm.data, ldm.pipelines; print(ldm.data.__name__, ldm.pipelines.Pipeline.__name__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.split() == ["ldm.data", "Pipeline"], out.stderr


def _requirements():
    """Returns {normalised name: lower-bound text} of pyproject's dependencies and dev extra."""
    import re

    project = tomllib.load(open(os.path.join(ROOT, "pyproject.toml"), "rb"))["project"]
    out = {}
    for req in project["dependencies"] + project["optional-dependencies"]["dev"]:
        name, _, bound = re.match(r"([A-Za-z0-9_.\-]+)\s*(>=\s*([0-9.]+))?", req).groups()
        out[re.sub(r"[-_.]+", "-", name).lower()] = bound
    return out


def _pins():
    import re

    pins = {}
    for line in open(os.path.join(ROOT, "configs", "constraints.txt"), encoding="utf-8"):
        line = line.strip()
        if line and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep, f"configs/constraints.txt: {line!r} is not an exact pin (NAME==VERSION)"
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    return pins


def test_every_dependency_is_pinned_at_or_above_its_lower_bound():
    pins = _pins()
    for name, bound in _requirements().items():
        assert name in pins, f"{name} is a dependency but has no pin in configs/constraints.txt"
        if bound:
            have = tuple(int(x) for x in pins[name].split("+")[0].split(".")[:3] if x.isdigit())
            want = tuple(int(x) for x in bound.split("."))
            assert have >= want, f"{name}: pinned {pins[name]} is below pyproject's lower bound {bound}"
    assert "pip" in pins, "pin pip too: the install upgrades it through the constraints"


def test_installed_versions_are_the_pinned_ones():
    """The suite runs on the recorded set: a drift here means the install did not use configs/constraints.txt."""
    from importlib.metadata import version

    pins = _pins()
    for name in ("torch", "diffusers", "transformers", "peft", "accelerate", "open-clip-torch", "safetensors"):
        assert version(name) == pins[name], f"{name} {version(name)} installed, {pins[name]} pinned"


def test_ci_installs_exactly_as_the_readme_says():
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    ci = open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8").read()
    install = readme.split("## Install", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    commands = [line for line in install.splitlines() if line.startswith("pip ")]
    assert commands and all("-c configs/constraints.txt" in c for c in commands), commands
    ci_commands = [" ".join(w for w in line.split() if w != "--progress-bar" and w != "off")
                   for line in ci.splitlines() if line.startswith("pip ")]
    assert ci_commands == commands, f"README install {commands} != .ci/run {ci_commands}"
    tests = readme.split("## Test", 1)[1].split("```bash", 1)[1].split("```", 1)[0].strip().splitlines()
    for test in tests:  # the fast and the slow tier
        assert test in ci, f"README's test command {test!r} is not what .ci/run runs"

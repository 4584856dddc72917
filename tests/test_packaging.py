"""One import namespace: every package folder is listed in pyproject.toml, and a user's data/ cannot shadow ours."""
import os
import subprocess
import sys
import tomllib

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


def test_users_data_folder_does_not_shadow_ldm_data(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "__init__.py").write_text("raise SystemExit('shadowed')\n")
    code = "import ldm.data, ldm.pipelines; print(ldm.data.__name__, ldm.pipelines.Pipeline.__name__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.split() == ["ldm.data", "Pipeline"], out.stderr

"""MkDocs hook: serve the repository's benchmark figures and BENCHMARKS.md as site files, without copies in docs/.

benchmarks/figures/**  -> figures/**       (pages link ../figures/demo/samples_ddim_g4.png and so on)
benchmarks/results/**  -> results/**       (BENCHMARKS.md links its raw results)
benchmarks/BENCHMARKS.md -> benchmarks.md  (a page; its own links figures/... and results/... resolve as in the repo)
"""
from pathlib import Path

from mkdocs.structure.files import File

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def on_files(files, config):
    """Returns the site's files with the benchmark figures, results and BENCHMARKS.md added."""
    for folder in ("figures", "results"):
        for path in sorted((BENCHMARKS / folder).rglob("*")):
            if path.is_file():
                uri = f"{folder}/{path.relative_to(BENCHMARKS / folder).as_posix()}"
                files.append(File.generated(config, uri, abs_src_path=str(path)))
    files.append(File.generated(config, "benchmarks.md", abs_src_path=str(BENCHMARKS / "BENCHMARKS.md")))
    return files

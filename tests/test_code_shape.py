"""The code's shape, kept by tests (STYLE.md 1, 13, 14): short functions, one copy of each diffusion formula, and
no measured figures in comments or docstrings (they go stale there; they belong in benchmarks/BENCHMARKS.md or
the README)."""
import ast
import io
import re
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = ("ldm", "pipelines", "data", "train", "benchmarks")
MAX_FUNCTION_LINES = 60
PROCESS = "ldm/diffusion/process.py"

# Files that hold a deliberately independent implementation of a diffusion formula, and why: a benchmark's
# baseline must not share our code, or it would measure nothing.
INDEPENDENT_REFERENCES = {
    "benchmarks/bench_train.py": "the reference train step, diffusers' train_text_to_image loop written plainly, "
                                 "that our train step is timed against",
}

# The characteristic expressions of the diffusion formulas, matched on the code alone (comments and strings
# removed, tokens joined without spaces, see _code): X is a name, attribute, call-free method or index.
X = r"[\w.]+(?:\(\))?(?:\[[^\]]*\])?"
SQRT = rf"(?:{X}\.sqrt\(\)|torch\.sqrt\({X}\)|{X}\*\*0?\.5)"
SQRT_1M = rf"(?:\(1-{X}\)\.sqrt\(\)|torch\.sqrt\(1-{X}\)|\(1-{X}\)\*\*0?\.5)"  # sqrt(1 - alpha_bar)
FORMULAS = {
    "alpha_bar as a cumulative product": re.compile(r"\.cumprod\("),
    "sqrt(a) x +- sqrt(1 - a) y (noising, v)": re.compile(rf"{SQRT}\*{X}[+-]{SQRT_1M}\*|{SQRT_1M}\*{X}[+-]{SQRT}\*"),
    "(x_t - sqrt(1 - a) eps) / sqrt(a), or / sqrt(1 - a)": re.compile(rf"-{SQRT_1M}\*{X}\)/|/{SQRT_1M}"),
    "SNR a / (1 - a), or sigma^2 (1 - a) / a": re.compile(rf"(?<![\w.])({X})/\(1-\1\)|\(1-({X})\)/\2(?![\w.(\[])"),
}

# Measured figures: times, rates, quality and memory with their units, speed-ups, PSNR values.
MEASURED = re.compile(
    r"\b\d+(?:\.\d+)?\s?(?:ms|dB|GiB|GB)(?![\w/])"
    r"|\b\d+(?:\.\d+)? (?:\w+ ){0,2}(?:it|steps|images|samples)/s\b"
    r"|\b\d+(?:\.\d+)?x (?:faster|slower)\b"
    r"|\b\d+(?:\.\d+)? ?(?:s|min|minutes) (?:on|a step|per step)\b"
    r"|\bPSNR (?:of )?\d")


def _python_files() -> list[str]:
    return sorted(str(p.relative_to(ROOT)) for folder in FOLDERS for p in (ROOT / folder).rglob("*.py"))


def _source(path: str) -> str:
    return (ROOT / path).read_text(encoding="utf-8")


def _code(source: str) -> str:
    """Returns the source without comments and strings, its tokens joined without spaces except between two
    names or numbers, one logical line per line: `a.sqrt() * x0` reads `a.sqrt()*x0`."""
    out, prev = [], None
    skipped = (tokenize.COMMENT, tokenize.STRING, tokenize.NL, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER)
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type in skipped:
            continue
        if tok.type == tokenize.NEWLINE:
            out.append("\n")
            prev = None
            continue
        if prev is not None and {prev.type, tok.type} <= {tokenize.NAME, tokenize.NUMBER}:
            out.append(" ")
        out.append(tok.string)
        prev = tok
    return "".join(out)


def _prose(source: str) -> list[tuple[int, str]]:
    """Returns (line, text) of every comment and docstring."""
    texts = [(tok.start[0], tok.string) for tok in tokenize.generate_tokens(io.StringIO(source).readline)
             if tok.type == tokenize.COMMENT]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=False)
            if doc:
                texts.append((node.body[0].lineno, doc))
    return texts


def _functions(tree: ast.AST) -> list[ast.FunctionDef]:
    """Returns every module-level and nested function of a module, without the methods of its classes."""
    methods = {id(f) for c in ast.walk(tree) if isinstance(c, ast.ClassDef) for f in c.body}
    return [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
            and id(n) not in methods]


def test_no_function_or_method_is_longer_than_60_lines():
    too_long = []
    for path in _python_files():
        for node in ast.walk(ast.parse(_source(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1  # from `def` to its last line, decorators excluded
                if length > MAX_FUNCTION_LINES:
                    too_long.append(f"{path}:{node.lineno} {node.name} ({length} lines)")
    assert not too_long, f"split these into functions of at most {MAX_FUNCTION_LINES} lines: {too_long}"


def test_each_diffusion_formula_is_defined_only_in_process():
    from ldm.diffusion import process

    formulas = {name for name in process.__all__ if callable(getattr(process, name))}
    assert {"add_noise", "velocity", "alphas_cumprod", "snr", "to_parameterisations"} <= formulas
    copies = [f"{path}:{node.lineno} {node.name}" for path in _python_files() if path != PROCESS
              for node in _functions(ast.parse(_source(path))) if node.name in formulas]
    assert not copies, f"call ldm.diffusion's function instead of defining it again: {copies}"


@pytest.mark.parametrize("name", FORMULAS)
def test_diffusion_expressions_are_written_only_in_process(name):
    pattern = FORMULAS[name]
    assert pattern.search(_code(_source(PROCESS))), f"the pattern for {name!r} no longer finds its formula"
    copies = [f"{path}: {m.group(0)}" for path in _python_files() if path != PROCESS
              and path not in INDEPENDENT_REFERENCES for m in pattern.finditer(_code(_source(path)))]
    assert not copies, f"{name} is written again outside {PROCESS}; call ldm.diffusion instead: {copies}"


def test_the_formula_patterns_find_a_hand_written_copy():
    copy = ("def predict_x0(a, x_t, eps, v, betas):\n    alpha_bar = torch.cumprod(1 - betas, dim=0)\n"
            "    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps  # noised\n"
            "    x0 = (x_t - (1 - a).sqrt() * eps) / a.sqrt()\n    snr = a / (1 - a)\n"
            "    return alpha_bar_t ** 0.5 * x_t - (1 - alpha_bar_t[t]) ** 0.5 * v\n")
    assert all(pattern.search(_code(copy)) for pattern in FORMULAS.values())
    assert not any(pattern.search(_code("# x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps\nreturn (1 - a).sqrt() * y\n"))
                   for pattern in FORMULAS.values())


def test_no_measured_figure_in_a_comment_or_docstring():
    found = [f"{path}:{line}: {m.group(0)!r}" for path in _python_files()
             for line, text in _prose(_source(path)) for m in MEASURED.finditer(text)]
    for path in sorted(str(p.relative_to(ROOT)) for p in (ROOT / "configs").rglob("*.yaml")):
        found += [f"{path}:{i}: {m.group(0)!r}" for i, line in enumerate(_source(path).splitlines(), 1)
                  if "#" in line for m in MEASURED.finditer(line[line.index("#"):])]
    assert not found, f"move these figures, with how they were measured, to benchmarks/BENCHMARKS.md or the " \
                      f"README, and say in the comment what the code does and why: {found}"


def test_the_measured_figure_pattern_finds_figures():
    for text in ("5.3 min on 2 CPU cores (0.14 s a step)", "PSNR 25.9 vs 27.5", "149 denoising steps/s",
                 "2.3x slower", "9-12 ms a call", "peak 2.74 GiB"):
        assert MEASURED.search(text), text
    for text in ("0 = never", "a 64 px image", "at most 60 lines", "beta_start 0.00085", "t = 999"):
        assert not MEASURED.search(text), text


# ------------------------------------------------------------------ layers import downward only (STYLE.md 16)
# Each level, lowest first, lists its packages in their order inside the level: a package may import the packages
# of the levels below and those before it in its own level, never the ones after (siblings never import each other
# both ways). Core modules are plain helpers every layer uses (files, ranges, PNG metadata): they import only core.
LAYERS: list[tuple[str, list[str]]] = [
    ("core", ["ldm", "ldm.folders", "ldm.flags", "ldm.ranges", "ldm.images"]),
    # the diffusion math is pure functions; objectives put it behind one interface; the models (presets, LoRA,
    # the VAE) may ask an objective or the math, never the reverse
    ("models, diffusion, objectives", ["ldm.diffusion", "ldm.objectives", "ldm.models"]),
    # data feeds training only; the pipelines sample: neither needs the other, data first by the data flow
    ("data, pipelines", ["ldm.data", "ldm.pipelines"]),
    # diagnostics read a model and write plots; evaluation scores models (and may use a diagnostic's files);
    # training calls both for its validation and its demo report
    ("training, evaluation, diagnostics", ["ldm.diagnostics", "ldm.evaluation", "ldm.training"]),
    ("ui", ["ldm.ui"]),
    ("cli", ["ldm.cli"]),
]
SCRIPT_FOLDERS = ("train", "benchmarks")   # scripts above every layer: they may import anything
NAMESPACE = {"ldm": "ldm", "pipelines": "ldm.pipelines", "data": "ldm.data"}  # pyproject.toml's package-dir


def _rank(module: str) -> tuple[int, int, str] | None:
    """Returns (level, order inside the level, package) of an ldm module: its longest listed prefix."""
    best = None
    for level, (_, packages) in enumerate(LAYERS):
        for order, package in enumerate(packages):
            if (module == package or module.startswith(package + ".")) and (best is None or len(package) > len(best[2])):
                best = (level, order, package)
    return best


def _module_name(path: str) -> str:
    parts = list(Path(path).with_suffix("").parts)
    parts[0] = NAMESPACE[parts[0]]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _ldm_modules() -> set[str]:
    return {_module_name(p) for p in _python_files() if Path(p).parts[0] in NAMESPACE}


def _imports(path: str, tree: ast.AST, modules: set[str]) -> list[tuple[int, str]]:
    """Returns (line, module) of every ldm module a file imports: module-level and function-local imports,
    relative ones resolved, `from package import submodule` as the submodule, importlib.import_module("ldm...")."""
    package = _module_name(path) if path.endswith("__init__.py") else _module_name(path).rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            subs = [f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in modules]
            found += [(node.lineno, name) for name in subs] or [(node.lineno, base)]
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str) and node.args[0].value.startswith("ldm")
              and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"):
            found.append((node.lineno, node.args[0].value))
    return [(line, name) for line, name in found if name == "ldm" or name.startswith("ldm.")]


def _upward_imports(files: dict[str, str]) -> list[str]:
    """Returns `file:line imports X (layer a -> layer b)` for every import of a higher layer, or of a later
    sibling in the same layer, among `files` (path -> source)."""
    modules = _ldm_modules() | {_module_name(p) for p in files if Path(p).parts[0] in NAMESPACE}
    wrong = []
    for path, source in files.items():
        if Path(path).parts[0] not in NAMESPACE:
            continue  # train/ and benchmarks/ scripts sit above every layer
        own = _rank(_module_name(path))
        for line, name in _imports(path, ast.parse(source), modules):
            other = _rank(name)
            if other is None or own is None:
                wrong.append(f"{path}:{line} imports {name} (a module no layer lists)")
            elif other[:2] > own[:2]:
                where = "a higher layer" if other[0] > own[0] else "a later sibling"
                wrong.append(f"{path}:{line} imports {name} ({where}: {own[2]} in {LAYERS[own[0]][0]} -> "
                             f"{other[2]} in {LAYERS[other[0]][0]})")
    return wrong


def test_layers_import_downward_only():
    wrong = _upward_imports({path: _source(path) for path in _python_files()})
    assert not wrong, ("a layer imports only the layers below it (STYLE.md 16; order in LAYERS): move the code "
                       "it needs down, or the caller up:\n" + "\n".join(wrong))


def test_the_layer_map_places_every_package():
    top = {".".join(m.split(".")[:2]) for m in _ldm_modules()}
    listed = {package for _, packages in LAYERS for package in packages}
    assert top <= listed, f"place these in LAYERS (tests/test_code_shape.py): {sorted(top - listed)}"
    assert not listed - top, f"LAYERS lists packages that do not exist: {sorted(listed - top)}"
    import tomllib
    packages = tomllib.loads(_source("pyproject.toml"))["tool"]["setuptools"]["packages"]
    assert all(_rank(p) for p in packages), [p for p in packages if not _rank(p)]
    assert all(Path(folder).is_dir() for folder in (ROOT / f for f in SCRIPT_FOLDERS))


def test_the_layer_check_finds_upward_and_function_local_imports():
    files = {
        "ldm/models/bad.py": "def f():\n    from ldm.training import loop\n",
        "ldm/diagnostics/bad.py": "import importlib\nx = importlib.import_module('ldm.cli.generate')\n",
        "data/bad.py": "from ..pipelines import stable\n",           # a later sibling in the same layer, relative
        "ldm/folders.py": "from ldm import diffusion\n",               # core imports only core
        "ldm/cli/fine.py": "from ldm.ui import server\nfrom ldm import models\n",
        "train/fine.py": "from ldm.cli import main\n",
    }
    wrong = _upward_imports(files)
    assert [w.split(" (")[0] for w in wrong] == [
        "ldm/models/bad.py:2 imports ldm.training.loop", "ldm/diagnostics/bad.py:2 imports ldm.cli.generate",
        "data/bad.py:1 imports ldm.pipelines.stable", "ldm/folders.py:1 imports ldm.diffusion"], wrong


# Paths named in prose and messages: a token that starts at one of the repository's top-level folders and names a
# file (by its extension), or any ldm/... path (ldm.data and ldm.pipelines are modules; their files are in data/
# and pipelines/). Globs, brace lists and placeholders (RUN/..., checkpoint-N) do not start at a top-level folder
# or are skipped.
TOP_FOLDERS = ("ldm", "data", "pipelines", "train", "tests", "benchmarks", "configs", "docs", ".ci")
REPO_PATH = re.compile(r"(?<![\w./~-])((?:%s)/[\w./-]*[\w])" % "|".join(map(re.escape, TOP_FOLDERS)))
FILE_SUFFIXES = (".py", ".md", ".yaml", ".yml", ".toml", ".txt", ".json", ".sh")


def _named_paths(text: str) -> list[str]:
    """Returns the repository paths `text` names: files by extension, and every ldm/... path."""
    return [m.group(1) for m in REPO_PATH.finditer(text)
            if m.group(1).endswith(FILE_SUFFIXES) or m.group(1).startswith("ldm/")]


def _strings_and_comments(path: str) -> list[tuple[int, str]]:
    """Returns (line, text) of every comment and string literal (docstrings, messages) of a Python file (of a
    test file: its comments and docstrings, since its other strings are test data such as made-up paths), every
    comment of a YAML file, or the whole text of a Markdown page."""
    source = _source(path)
    if path.endswith(".md"):
        return [(1, source)]
    if not path.endswith(".py"):
        return [(i, line[line.index("#"):]) for i, line in enumerate(source.splitlines(), 1) if "#" in line]
    test_data = path.startswith("tests/")
    return [(tok.start[0], tok.string) for tok in tokenize.generate_tokens(io.StringIO(source).readline)
            if tok.type == tokenize.COMMENT or (tok.type == tokenize.STRING
                                               and not (test_data and not tok.string.startswith('"""')))]


def test_every_path_named_in_a_docstring_comment_or_message_exists():
    files = sorted(str(p.relative_to(ROOT)) for folder in ("ldm", "data", "pipelines", "train", "benchmarks", "tests")
                   for p in (ROOT / folder).rglob("*.py"))
    files += sorted(str(p.relative_to(ROOT)) for p in (ROOT / "configs").rglob("*.yaml"))
    files += ["README.md", "benchmarks/BENCHMARKS.md"] + sorted(str(p.relative_to(ROOT))
                                                                for p in (ROOT / "docs").rglob("*.md"))
    missing = [f"{path}:{line + text[:text.index(named)].count(chr(10))}: {named}"
               for path in files for line, text in _strings_and_comments(path)
               for named in _named_paths(text) if not (ROOT / named).exists()]
    assert not missing, f"these paths do not exist (ldm.data's files are in data/, ldm.pipelines' in pipelines/): " \
                        f"{missing}"


def test_the_path_pattern_finds_paths_and_leaves_placeholders():
    text = ("see {L}/data/photos.py and data/photos.py, {L}/pipelines/, configs/sd15.yaml; RUN/checkpoints/"
            "checkpoint-N/vae, model/unet/config.json, data/*.png, a train/held-out split").replace("{L}", "ldm")
    wrong = ["ldm" + "/data/photos.py", "ldm" + "/pipelines"]  # split, or this file would name them
    assert _named_paths(text) == [wrong[0], "data/photos.py", wrong[1], "configs/sd15.yaml"]
    assert [p for p in _named_paths(text) if not (ROOT / p).exists()] == wrong

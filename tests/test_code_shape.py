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
    """Returns (line, text) of every comment and string literal (docstrings, messages) of a Python file, or of
    every comment of a YAML file."""
    source = _source(path)
    if not path.endswith(".py"):
        return [(i, line[line.index("#"):]) for i, line in enumerate(source.splitlines(), 1) if "#" in line]
    return [(tok.start[0], tok.string) for tok in tokenize.generate_tokens(io.StringIO(source).readline)
            if tok.type in (tokenize.COMMENT, tokenize.STRING)]


def test_every_path_named_in_a_docstring_comment_or_message_exists():
    files = sorted(str(p.relative_to(ROOT)) for folder in ("ldm", "data", "pipelines", "train", "benchmarks", "tests")
                   for p in (ROOT / folder).rglob("*.py"))
    files += sorted(str(p.relative_to(ROOT)) for p in (ROOT / "configs").rglob("*.yaml"))
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

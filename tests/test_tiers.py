"""The two test tiers (tests/conftest.py): a plain `pytest` deselects the tests marked slow; `--runslow` or
LDM_SLOW=1 runs them too; `--runslow -m slow` runs the slow tier alone. Checked on a two-test suite run in-process."""
import glob
import os

import conftest

pytest_plugins = ["pytester"]

SUITE = """
import pytest

def test_fast():
    pass

@pytest.mark.slow
def test_slow():
    pass
"""


def run(pytester, *args):
    pytester.makepyfile(test_suite=SUITE)
    return pytester.runpytest("-p", "no:randomly", "-p", "no:cacheprovider", *args, plugins=[conftest])


def test_a_plain_run_deselects_the_slow_tests(pytester, monkeypatch):
    monkeypatch.delenv("LDM_SLOW", raising=False)
    result = run(pytester)
    result.assert_outcomes(passed=1, deselected=1)
    result.stdout.fnmatch_lines(["*fast only*--runslow*LDM_SLOW=1*"])


def test_runslow_or_ldm_slow_runs_both_tiers(pytester, monkeypatch):
    monkeypatch.delenv("LDM_SLOW", raising=False)
    run(pytester, "--runslow").assert_outcomes(passed=2)
    monkeypatch.setenv("LDM_SLOW", "1")
    run(pytester).assert_outcomes(passed=2)
    monkeypatch.setenv("LDM_SLOW", "0")
    run(pytester).assert_outcomes(passed=1, deselected=1)


def test_runslow_with_marker_runs_the_slow_tier_alone(pytester, monkeypatch):
    monkeypatch.delenv("LDM_SLOW", raising=False)
    result = run(pytester, "--runslow", "-m", "slow", "-v")
    result.assert_outcomes(passed=1, deselected=1)
    result.stdout.fnmatch_lines(["*test_slow PASSED*"])


def test_both_tiers_of_this_suite_hold_tests():
    """.ci/run runs each tier on its own: a tier with no test would end pytest with exit code 5."""
    here = os.path.dirname(os.path.abspath(__file__))
    sources = [open(path).read() for path in glob.glob(os.path.join(here, "test_*.py"))]
    assert any("@pytest.mark.slow\ndef test_" in source for source in sources)
    assert any("\ndef test_" in source.replace("@pytest.mark.slow\ndef test_", "") for source in sources)

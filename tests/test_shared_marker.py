"""The ``shared`` marker (conftest.py): skipped with its reason without ``--full`` or without ../shared, and a
failure, not a skip, under ``CI=true`` with ``--full``, so that CI cannot pass with them silently skipped."""
from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

TESTS = """
import pytest

@pytest.mark.shared
def test_needs_shared():
    pass

def test_plain():
    pass
"""


@pytest.fixture
def suite(pytester: pytest.Pytester, monkeypatch, tmp_path):
    pytester.makeconftest((Path(__file__).parent / "conftest.py").read_text())
    pytester.makepyfile(test_suite=TESTS)
    monkeypatch.setenv("SLIMCNN_SHARED", str(tmp_path / "no-shared-here"))
    return pytester


def test_a_marked_test_that_finds_no_shared_under_ci_fails_the_run(suite, monkeypatch):
    monkeypatch.setenv("CI", "true")
    result = suite.runpytest_subprocess("--full", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, errors=1)  # failed in setup, where the marker is checked
    result.stdout.fnmatch_lines(["*CI=true and *no-shared-here is missing*"])
    assert result.ret != 0


def test_without_ci_a_missing_shared_skips_with_how_to_run_it(suite, monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    result = suite.runpytest_subprocess("--full", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, skipped=1)
    result.stdout.fnmatch_lines(['1 test(s) marked shared skipped: *python -m pytest -n 2 --full -m "shared or slow"'])


def test_the_default_command_skips_marked_tests_even_in_ci(suite, monkeypatch):
    monkeypatch.setenv("CI", "true")
    result = suite.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, skipped=1)
    result.stdout.fnmatch_lines(["1 test(s) marked shared skipped: *--full*"])
    assert result.ret == 0


def test_a_slow_test_runs_with_full_and_needs_no_shared(suite, monkeypatch):
    suite.makepyfile(test_slow="import pytest\n\n@pytest.mark.slow\ndef test_long():\n    pass\n")
    monkeypatch.setenv("CI", "true")
    suite.runpytest_subprocess("-p", "no:cacheprovider", "test_slow.py").assert_outcomes(skipped=1)
    suite.runpytest_subprocess("--full", "-p", "no:cacheprovider", "test_slow.py").assert_outcomes(passed=1)

"""What a bench row records about the code and the machine it ran on (slimcnn/report.py: provenance)."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from slimcnn.report import code_differs, code_version, machine_load, provenance

ROOT = Path(__file__).resolve().parent.parent


def test_the_commit_is_the_checkout_head_and_dirty_follows_the_code(tmp_path):
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    v = code_version()
    if head.returncode != 0:  # not a git checkout (an sdist): nothing to record, nothing invented
        assert v == {"commit": None, "dirty": None}
        return
    assert v["commit"] == head.stdout.strip() and re.fullmatch(r"[0-9a-f]{40}", v["commit"])
    code = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no", "--", "slimcnn",
                           "tests", "pyproject.toml"], capture_output=True, text=True).stdout.strip()
    if code:
        assert v["dirty"] is True


def test_load_is_a_share_of_all_cores_and_the_record_names_the_tools():
    load = machine_load(0.2)
    assert load["others_cpu_share"] is None or 0.0 <= load["others_cpu_share"] <= 1.0
    p = provenance()
    assert {"commit", "dirty", "load_avg_1m", "others_cpu_share", "torch_threads", "versions", "time"} <= set(p)
    assert p["versions"]["torch"] and set(p["versions"]) == {"torch", "torch-pruning", "nvidia-modelopt",
                                                             "onnxruntime"}


def test_rows_measured_with_other_code_are_refused_or_kept_marked(tmp_path):
    from slimcnn.bench import check_stale

    unknown = {"row": "l1", "provenance": {"start": {"commit": "0" * 40}}}  # no such commit: cannot tell
    untold = {"row": "tp-peer"}  # from before rows recorded their code
    with pytest.raises(ValueError, match=r"2 row\(s\) in .*r.json were measured with other code.*--keep-stale"):
        check_stale([unknown, untold], False, tmp_path / "r.json")
    check_stale([unknown, untold], True, tmp_path / "r.json")
    assert unknown["stale"] and untold["stale"]
    here = code_version()
    if here["commit"] is not None:  # a row of this very code is kept as it is
        same = {"row": "l1", "provenance": {"start": {"commit": here["commit"],
                                                      "code_diff_sha256": here.get("code_diff_sha256")}}}
        check_stale([same], False, tmp_path / "r.json")
        assert same["stale"] is False


def test_code_differs_follows_the_code_not_the_commit():
    here = code_version()
    if here["commit"] is None:
        pytest.skip("not a git checkout")
    assert not code_differs(here["commit"], here.get("code_diff_sha256"))
    assert code_differs(here["commit"], "another-edit") and code_differs(None)
    first = subprocess.run(["git", "-C", str(ROOT), "rev-list", "--max-parents=0", "HEAD"], capture_output=True,
                           text=True).stdout.split()
    if first:  # the first commit of the project had other code
        assert code_differs(first[0])

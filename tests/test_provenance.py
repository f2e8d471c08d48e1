"""What a bench row records about the code and the machine it ran on (slimcnn/report.py: provenance)."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

from slimcnn.report import code_version, machine_load, provenance

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

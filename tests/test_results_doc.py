"""docs/results.md and the README's results summary are what benchmarks/report.py writes from the committed JSON:
a figure typed by hand, or a results file changed without rerunning the generator, fails here."""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _report():
    spec = importlib.util.spec_from_file_location("results_report", ROOT / "benchmarks" / "report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_committed_results_doc_and_readme_summary_are_generated():
    report = _report()
    results = report.load_results()
    assert (ROOT / "docs" / "results.md").read_text() == report.document(results), \
        "docs/results.md differs from the JSON: run python benchmarks/report.py"
    readme = (ROOT / "README.md").read_text()
    assert report.with_summary(readme, report.summary(results)) == readme, \
        "the README's results summary differs from the JSON: run python benchmarks/report.py"


def test_the_readme_states_no_measured_top1_outside_the_summary():
    readme = (ROOT / "README.md").read_text()
    report = _report()
    outside = readme.split(report.BEGIN)[0] + readme.split(report.END)[1]
    assert not re.findall(r"top-1[^.\n]{0,40}\b\d{2}\.\d{1,2}\b", outside)


def test_every_results_file_gets_a_section_and_a_command():
    report = _report()
    doc = report.document(report.load_results())
    for path in sorted((ROOT / "benchmarks" / "results").glob("*.json")):
        section = doc.split(f"### {path.stem}\n", 1)
        assert len(section) == 2, f"{path.name} has no section in docs/results.md"
        assert section[1].lstrip().startswith("```bash\n"), f"{path.name}: no command above its table"

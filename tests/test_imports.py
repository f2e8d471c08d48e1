"""slimcnn works with only its runtime dependencies: every third-party import is declared in pyproject.toml,
optional packages (the extras) are imported lazily, and a feature that needs one says which extra in one line.

The environment that runs the tests has every extra installed, so the "without the extras" checks run in a
subprocess whose import system refuses the extras' packages (a ``sys.meta_path`` finder installed before
anything else is imported), which is what a user who ran ``pip install -e .`` alone would see.
"""
from __future__ import annotations

import ast
import importlib.metadata
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "slimcnn"

# distribution -> the top-level modules it provides, for every package of an extra (checked below to be complete)
EXTRA_MODULES = {
    "pytest": ["pytest", "_pytest"], "pytest-xdist": ["xdist"], "hypothesis": ["hypothesis"],
    "onnx": ["onnx"], "onnxruntime": ["onnxruntime"],
    "nvidia-modelopt": ["modelopt"], "torchprofile": ["torchprofile"], "requests": ["requests"],
    "huggingface-hub": ["huggingface_hub"], "timm": ["timm"],
}

BLOCKER = r"""
import importlib.abc, sys
BLOCKED = set({blocked!r})
class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}} (hidden by the test: not a runtime dependency)",
                                      name=name)
        return None
sys.meta_path.insert(0, Blocker())
"""


def _norm(dist: str) -> str:
    return re.sub(r"[-_.]+", "-", dist).lower()


def _requirements() -> tuple[set[str], dict[str, set[str]]]:
    """(runtime distributions, extra -> distributions) as declared in pyproject.toml."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    name = lambda req: _norm(re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", req).group(0))  # noqa: E731
    extras = {k: {name(r) for r in v} for k, v in project.get("optional-dependencies", {}).items()}
    return {name(r) for r in project["dependencies"]}, extras


def _third_party_imports() -> list[tuple[str, str, bool]]:
    """(file, top-level module, imported at module level) for every absolute non-stdlib import under slimcnn/."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        lazy: set[int] = set()  # ids of import nodes inside a function body
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lazy.update(id(n) for n in ast.walk(fn))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                mods = [node.module]
            else:
                continue
            for mod in mods:
                top = mod.partition(".")[0]
                if top not in sys.stdlib_module_names and top not in ("slimcnn", "__future__"):
                    found.append((str(path.relative_to(ROOT)), top, id(node) not in lazy))
    return found


def test_every_extra_package_is_known_to_the_blocker():
    _, extras = _requirements()
    unknown = {d for dists in extras.values() for d in dists} - set(EXTRA_MODULES)
    assert not unknown, f"add the modules of {sorted(unknown)} to EXTRA_MODULES so the import test hides them"


def test_every_third_party_import_is_declared_and_extras_are_lazy():
    runtime, extras = _requirements()
    optional = {d for dists in extras.values() for d in dists} - runtime
    provides = {m: _norm(d) for d, mods in EXTRA_MODULES.items() for m in mods}
    for module, dists in importlib.metadata.packages_distributions().items():
        provides.setdefault(module, _norm(dists[0]))
    undeclared, eager = [], []
    for file, module, module_level in _third_party_imports():
        dist = provides.get(module, _norm(module))
        if dist not in runtime and dist not in optional:
            undeclared.append(f"{file}: {module} ({dist})")
        elif dist in optional and module_level:
            eager.append(f"{file}: {module} ({dist}, an extra)")
    assert not undeclared, "imported but not declared in pyproject.toml: " + "; ".join(undeclared)
    assert not eager, "an extra's package imported at module level: " + "; ".join(eager)


def _run_without(blocked: list[str], code: str, timeout: float = 120) -> subprocess.CompletedProcess:
    script = BLOCKER.format(blocked=sorted(blocked)) + code
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT)


ALL_EXTRAS = sorted({m for mods in EXTRA_MODULES.values() for m in mods})


def test_every_module_imports_with_only_the_runtime_dependencies():
    code = r"""
import importlib, json, pkgutil
try:
    import onnx
    hidden = False
except ModuleNotFoundError:
    hidden = True
import slimcnn
failed, done = {}, []
def note(name):
    failed[name] = "error while walking the package"
for info in pkgutil.walk_packages(slimcnn.__path__, "slimcnn.", onerror=note):
    if info.name == "slimcnn.__main__":  # importing it runs the CLI; it imports nothing but slimcnn.cli
        continue
    try:
        importlib.import_module(info.name)
        done.append(info.name)
    except Exception as e:
        failed[info.name] = f"{type(e).__name__}: {e}"
print(json.dumps({"hidden": hidden, "failed": failed, "done": done}))
"""
    proc = _run_without(ALL_EXTRAS, code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["hidden"], "the blocker did not hide onnx: this test would prove nothing"
    assert not result["failed"], result["failed"]
    assert {"slimcnn.cli", "slimcnn.commands.models", "slimcnn.methods.modelopt_peer", "slimcnn.methods.csgd",
            "slimcnn.commands.export"} <= set(result["done"])


def test_export_without_the_onnx_extra_says_which_extra_in_one_line(tmp_path):
    code = f"""
import sys
import slimcnn
from slimcnn.cli import main
slimcnn.save(slimcnn.create("seg_tiny"), {str(tmp_path / "m")!r})
sys.exit(main(["export", {str(tmp_path / "m")!r}, "--onnx", {str(tmp_path / "m.onnx")!r}, "--check"]))
"""
    proc = _run_without(["onnx", "onnxruntime"], code)
    err = proc.stderr.strip()
    assert proc.returncode == 2, err[-3000:]
    assert len(err.splitlines()) == 1 and 'pip install -e ".[onnx]"' in err and "onnx" in err, err
    assert not (tmp_path / "m.onnx").exists()


# Packages the CLI's parser and `--help` must not import: Torch-Pruning alone (with the timm, torchvision,
# torch._dynamo and sympy it pulls in) doubled `slimcnn --help` on a 2-core machine (issue 20); the others are
# extras or plotting/ML libraries only some commands use.
HEAVY_AT_STARTUP = ["torch_pruning", "timm", "torchvision", "torch._dynamo", "sympy", "matplotlib", "onnx",
                    "onnxruntime", "modelopt", "sklearn", "scipy"]


def test_cli_help_imports_no_heavy_package():
    code = f"""
import json, sys
import slimcnn, slimcnn.cli
slimcnn.cli.build_parser()
for argv in (["--help"], ["demo", "--help"]):
    try:
        slimcnn.cli.main(argv)
    except SystemExit:
        pass
print(json.dumps([m for m in {HEAVY_AT_STARTUP!r} if m in sys.modules]))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not loaded, f"importing slimcnn / building the CLI parser imported {loaded}: import them where first used"

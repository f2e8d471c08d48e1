"""Models slimcnn does not define: timm's (``timm:<name>``) and a user's own builder, named by import path
(``path/to/file.py:factory`` or ``package.module:factory``).

Both are built with fresh weights and never download anything: timm models are created with
``pretrained=False`` (load a local file with ``--weights``), and a user's builder is their own code. Every way a
build can fail (no timm, an unknown name, a file that does not exist or does not import, a missing or raising
factory, a factory that returns something else than an ``nn.Module``) is one :class:`ModelBuildError` naming the
builder, so the CLI prints one line instead of a traceback from inside the user's file.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

from torch import nn

#: name prefixes of the model libraries slimcnn builds by name (never by running a user's code)
LIBRARY_PREFIXES = ("tv:", "timm:")


class ModelBuildError(ValueError):
    """A model named by ``timm:<name>`` or an import path cannot be built; the message says why in one line."""


def is_import_path(name: str) -> bool:
    """Whether ``name`` names a user's builder (``file.py:factory``, ``package.module:factory``, or anything
    path-like) rather than a zoo, ``tv:`` or ``timm:`` model."""
    if name.startswith(LIBRARY_PREFIXES):
        return False
    return ":" in name or "/" in name or "\\" in name or name.endswith(".py")


def build_timm(name: str, num_classes: int = 10, **kwargs: Any) -> nn.Module:
    """``timm.create_model(name, pretrained=False, num_classes=...)``; timm is the optional ``timm`` extra."""
    try:
        import timm
    except ImportError as e:
        raise ModelBuildError(f'timm:{name} needs timm ({e}): pip install -e ".[timm]"') from None
    if kwargs.get("pretrained"):
        raise ModelBuildError("timm: models are built without downloaded weights; load a local file with --weights")
    kwargs.pop("pretrained", None)
    if not timm.is_model(name):
        close = timm.list_models(f"*{name}*")[:8]
        hint = f"; similar: {', '.join(close)}" if close else ""
        raise ModelBuildError(f"unknown timm model {name!r}{hint} (timm.list_models() lists them all)")
    return timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)


def split_import_path(name: str) -> tuple[str, str]:
    """``("path/to/file.py" or "package.module", "factory")``; the factory follows the last colon, so a Windows
    drive letter stays with the path."""
    target, sep, factory = name.rpartition(":")
    if not sep or not target or not factory.isidentifier():
        raise ModelBuildError(f"model {name!r}: name the builder as path/to/file.py:factory or "
                              "package.module:factory")
    return target, factory


def _is_file_path(target: str) -> bool:
    return target.endswith(".py") or "/" in target or "\\" in target


def canonical_import_path(name: str) -> str:
    """``name`` with a builder file made absolute, so a saved model rebuilds from any working directory."""
    target, factory = split_import_path(name)
    if _is_file_path(target):
        return f"{Path(target).expanduser().resolve()}:{factory}"
    return name


def _load_file(path: Path) -> Any:
    """Import a builder file under a name derived from its absolute path (registered in ``sys.modules``, so the
    classes it defines can be found again by name, e.g. by ``inspect`` or ``copy``)."""
    if not path.is_file():
        raise ModelBuildError(f"model file not found: {path}")
    mod_name = "slimcnn_user_" + path.stem + "_" + hashlib.sha256(str(path).encode()).hexdigest()[:8]
    if mod_name in sys.modules:
        return sys.modules[mod_name]
    spec = importlib.util.spec_from_file_location(mod_name, path)
    if spec is None or spec.loader is None:
        raise ModelBuildError(f"cannot import model file {path}: not a Python source file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException as e:  # noqa: BLE001  (a SyntaxError or SystemExit in the user's file is theirs to fix)
        del sys.modules[mod_name]
        if isinstance(e, KeyboardInterrupt):
            raise
        raise ModelBuildError(f"cannot import model file {path}: {type(e).__name__}: {e}") from None
    return module


def _import_module(target: str) -> Any:
    """Import ``package.module``; if it is not importable as is, try again from the working directory, which the
    ``slimcnn`` console script (unlike ``python -m``) does not put on ``sys.path``."""
    try:
        return importlib.import_module(target)
    except ModuleNotFoundError as e:
        if e.name is None or not target.startswith(e.name.split(".")[0]) or os.getcwd() in sys.path:
            raise ModelBuildError(f"cannot import module {target!r}: {e}") from None
    except Exception as e:  # noqa: BLE001
        raise ModelBuildError(f"cannot import module {target!r}: {type(e).__name__}: {e}") from None
    sys.path.insert(0, os.getcwd())
    try:
        return importlib.import_module(target)
    except Exception as e:  # noqa: BLE001
        raise ModelBuildError(f"cannot import module {target!r}: {type(e).__name__}: {e}") from None
    finally:
        sys.path.remove(os.getcwd())


def build_from_import_path(name: str, num_classes: int = 10, **kwargs: Any) -> nn.Module:
    """Call the factory ``name`` names; ``num_classes`` is passed when the factory accepts it (by name or
    through ``**kwargs``), as are any other keywords."""
    target, factory_name = split_import_path(name)
    module = _load_file(Path(target).expanduser().resolve()) if _is_file_path(target) else _import_module(target)
    factory = getattr(module, factory_name, None)
    if not callable(factory):
        raise ModelBuildError(f"{target} has no callable {factory_name!r}"
                              f"{' (it is ' + type(factory).__name__ + ')' if factory is not None else ''}")
    try:
        model = _call_with_classes(factory, num_classes, kwargs)
    except Exception as e:  # noqa: BLE001  (the user's factory failing is one line, not their traceback)
        raise ModelBuildError(f"builder {name} raised {type(e).__name__}: {e}") from None
    if not isinstance(model, nn.Module):
        raise ModelBuildError(f"builder {name} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _call_with_classes(factory: Any, num_classes: int, kwargs: dict[str, Any]) -> Any:
    """``factory(num_classes=..., **kwargs)``, or ``factory(**kwargs)`` when the factory has no such keyword.

    Python refuses an unknown keyword while binding the call, before the factory's body runs, so the refusal is a
    TypeError whose traceback holds no frame beyond this one; a TypeError from inside the factory is its own
    failure and propagates as it is."""
    try:
        return factory(num_classes=num_classes, **kwargs)
    except TypeError as e:
        if e.__traceback__ is None or e.__traceback__.tb_next is not None or "'num_classes'" not in str(e):
            raise
    return factory(**kwargs)

"""Optional packages that are installed but broken, and the root cause of a failed model build.

A PyPI torchvision built for another torch (e.g. the CUDA wheel next to a CPU torch) raises
`RuntimeError: operator torchvision::nms does not exist` on import. transformers and timm import
torchvision whenever it is installed, so one broken optional package would break every `hf:`
model and hide the cause behind "Could not import module 'BertForMaskedLM'". memwise checks such
packages before transformers loads: a broken one is hidden (as if not installed) for specs that do
not need it, and a spec that needs it fails with the package, the reason and the fix.
"""

import importlib
import importlib.metadata
import importlib.util
import os
import sys
import traceback
from pathlib import Path

# Packages that transformers or timm import when they are installed, and that none of memwise's
# text workloads need.
OPTIONAL_PACKAGES = ("torchvision",)

_broken: dict[str, str] = {}  # package -> "ExceptionType: message" of its failed import


def import_failure(package: str) -> str | None:
    """Why `package` fails to import ("RuntimeError: ..."), or None when it imports or is not installed.

    A broken package is left hidden: `sys.modules[package] = None`, so `import package` raises
    ImportError and `importlib.util.find_spec` reports it absent, which is how transformers and
    timm decide that an optional package is not there.
    """
    if package in _broken:
        return _broken[package]
    if package in sys.modules:
        return None  # imported already (and working), or hidden by someone else
    try:
        if importlib.util.find_spec(package) is None:
            return None
    except (ImportError, ValueError):
        return None
    try:
        importlib.import_module(package)
    except Exception as error:  # noqa: BLE001  (any import failure is the thing reported)
        _broken[package] = f"{type(error).__name__}: {first_line(error)}"
        for name in [name for name in sys.modules if name == package or name.startswith(package + ".")]:
            del sys.modules[name]
        sys.modules[package] = None
        _forget_availability(package)
        return _broken[package]
    return None


def hide_broken_optional_packages() -> list[str]:
    """Checks `OPTIONAL_PACKAGES` before transformers loads; returns a sentence for each one hidden."""
    notes = []
    for package in OPTIONAL_PACKAGES:
        failure = import_failure(package)
        if failure is not None:
            notes.append(f"{package} is installed but fails to import ({failure}); it was treated as not installed")
    return notes


def broken_package_message(package: str, failure: str) -> str:
    """What is wrong with a package that fails to import and what to do about it."""
    try:
        version = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        version = "unknown version"
    import torch

    return (
        f"{package} fails to import: {failure}. {package} {version} is installed, but it does not work with "
        f"this torch {torch.__version__} (typically a wheel built for another torch or CUDA). "
        f"Install the {package} build that matches torch {torch.__version__}, or `pip uninstall {package}`"
    )


def root_cause(error: BaseException) -> tuple[BaseException, str | None]:
    """The innermost exception behind `error` (following `raise ... from` and implicit context) and the
    top-level package whose code raised it (None when it cannot be told)."""
    seen = set()
    while id(error) not in seen:
        seen.add(id(error))
        inner = error.__cause__ or (None if error.__suppress_context__ else error.__context__)
        if inner is None:
            break
        error = inner
    frames = traceback.extract_tb(error.__traceback__)
    return error, (_package_of(frames[-1].filename) if frames else None)


def _package_of(filename: str) -> str | None:
    path = Path(filename).resolve()
    roots = sorted((Path(entry or os.getcwd()).resolve() for entry in sys.path), key=lambda p: -len(str(p)))
    for root in roots:
        try:
            relative = path.relative_to(root)
        except ValueError:
            continue
        if len(relative.parts) > 1 or relative.suffix == ".py":
            return relative.parts[0].removesuffix(".py")
    return None


def _forget_availability(package: str) -> None:
    # transformers caches `is_<package>_available()`; if it was asked already, ask again.
    import_utils = sys.modules.get("transformers.utils.import_utils")
    check = getattr(import_utils, f"is_{package}_available", None)
    if check is not None and hasattr(check, "cache_clear"):
        check.cache_clear()


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (the exception's type name when it has none)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__

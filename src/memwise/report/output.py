"""`write_report`: the result's JSON, timeline plot and HTML page in one directory.

memwise never silently overwrites a file it did not write: it lists the files it writes in a
manifest, `.memwise-manifest.json`, in the output directory, and replaces only those.
"""

import json
import os
from pathlib import Path
from typing import Any

from memwise.core.errors import BadInputError
from memwise.report.atomic import write_atomic
from memwise.report.html import render_html
from memwise.report.plot import timeline_png

MANIFEST_NAME = ".memwise-manifest.json"
_MANIFEST_VERSION = 1
PLOT_NAME = "timeline.png"
HTML_NAME = "report.html"


def write_report(result: Any, out_dir: str | os.PathLike[str], *, stem: str = "profile", compare: Any = None) -> dict[str, Path]:
    """Writes `<stem>.json` (`result.to_dict()`), `timeline.png` and `report.html` into `out_dir`.

    `out_dir` is created when missing. Each file is written atomically (temporary file in the same
    directory, then `os.replace`); everything is rendered before the first file is written, and every
    target is checked first, so a refused or failed call leaves no file half-replaced. The manifest
    is updated after the files, so a crash in between can only make the next call refuse, never
    overwrite.

    Args:
        result: a `Profile` (or any result with `to_dict()` and the fields the report reads).
        out_dir: the directory to write into.
        stem: the JSON file's name without `.json`; a plain file name.
        compare: another result (e.g. the estimate of the same run) to overlay on the HTML
            page's interactive timeline.

    Returns:
        The written paths by kind: `{"json": ..., "png": ..., "html": ...}`.

    Raises:
        BadInputError: `stem` is not a plain file name, `out_dir` is not a directory, the manifest
            cannot be read, or a target exists that memwise did not write (its manifest does not
            list it): choose another --out directory or remove that file.
    """
    _check_stem(stem)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise BadInputError(f"out_dir: {str(out_dir)!r} exists and is not a directory; choose another --out directory")
    targets = {"json": out_dir / f"{stem}.json", "png": out_dir / PLOT_NAME, "html": out_dir / HTML_NAME}
    manifest_path = out_dir / MANIFEST_NAME
    owned = _read_manifest(manifest_path)
    for path in targets.values():
        _check_replaceable(path, owned, manifest_path)

    png = timeline_png(result)
    contents = {
        "json": (json.dumps(result.to_dict(), indent=2) + "\n").encode("utf-8"),
        "png": png,
        "html": render_html(result, png, compare=compare).encode("utf-8"),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    for kind, path in targets.items():
        write_atomic(path, contents[kind])
    files = sorted(owned | {path.name for path in targets.values()})
    manifest = {"version": _MANIFEST_VERSION, "files": files}
    write_atomic(manifest_path, (json.dumps(manifest, indent=2) + "\n").encode("utf-8"))
    return targets


def _check_stem(stem: str) -> None:
    separators = {os.sep, os.altsep} - {None}
    if (
        not isinstance(stem, str)
        or not stem.strip()
        or stem.startswith(".")
        or any(separator in stem for separator in separators)
        or "\0" in stem
    ):
        raise BadInputError(
            f"stem: must be a plain file name that does not start with '.', got {stem!r}; e.g. 'profile'"
        )


def _read_manifest(manifest_path: Path) -> set[str]:
    """The names of the files memwise wrote in the manifest's directory (empty without a manifest)."""
    if not manifest_path.exists():
        return set()
    try:
        data = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise BadInputError(
            f"{manifest_path}: cannot read memwise's manifest ({error}); remove it or choose another --out directory"
        ) from None
    files = data.get("files") if isinstance(data, dict) else None
    if not isinstance(files, list) or not all(isinstance(name, str) for name in files):
        raise BadInputError(
            f"{manifest_path}: not a memwise manifest (expected an object with a 'files' list of names); "
            "remove it or choose another --out directory"
        )
    return set(files)


def _check_replaceable(path: Path, owned: set[str], manifest_path: Path) -> None:
    if not (path.exists() or path.is_symlink()):
        return
    if path.name not in owned:
        raise BadInputError(
            f"{path}: the file exists and memwise did not write it (it is not listed in {manifest_path.name}); "
            "choose another --out directory or remove the file"
        )
    if path.is_symlink() or not path.is_file():
        raise BadInputError(
            f"{path}: exists and is not a regular file; choose another --out directory or remove it"
        )

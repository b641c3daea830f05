"""Which files `fusion validate` checks: named files always; in a directory, only the
files that look like workflows, so a repository's CI configuration (`.github/workflows`),
`docker-compose.yml` or Helm charts are not reported as broken workflows."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from fnmatch import fnmatch
from pathlib import Path, PurePosixPath

from engine.dsl.catalog import WORKFLOW_SUFFIXES
from engine.dsl.issues import WorkflowInvalid
from engine.dsl.source import load_file

# A document the loader refuses (bad YAML, over a limit) is judged by its text.
_STEPS_KEY = re.compile(r'^steps\s*:|^\s*"steps"\s*:', re.MULTILINE)


def looks_like_workflow(path: Path) -> bool:
    """A mapping at the top level with a `steps` key; for a file that does not parse, a
    line starting with `steps:` (or `"steps":` in JSON)."""
    try:
        data = load_file(path).data
    except WorkflowInvalid:
        try:
            return bool(_STEPS_KEY.search(path.read_text(encoding="utf-8", errors="replace")))
        except OSError:
            return False
    return isinstance(data, dict) and "steps" in data


def excluded(path: Path, globs: Sequence[str], below: Path | None = None) -> bool:
    """Whether a glob matches the path as listed, the path below the directory it was
    found in, or (right-anchored, as ``drafts/*.yaml``) its last components."""
    names = [path.as_posix()]
    if below is not None:
        names.append(path.relative_to(below).as_posix())
    return any(
        fnmatch(name, glob) or PurePosixPath(name).match(glob) for name in names for glob in globs
    )


def files_to_check(paths: Iterable[str], exclude: Sequence[str] = ()) -> list[Path]:
    """Named files as given (a missing one is the caller's to report); directories
    searched recursively for workflow-looking *.yaml, *.yml and *.json files, hidden
    files and directories skipped, in sorted order."""
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if not path.is_dir():
            if not excluded(path, exclude):
                found.append(path)
            continue
        for candidate in sorted(path.rglob("*")):
            relative = candidate.relative_to(path)
            if any(part.startswith(".") for part in relative.parts):
                continue
            if candidate.suffix not in WORKFLOW_SUFFIXES or not candidate.is_file():
                continue
            if excluded(candidate, exclude, path) or not looks_like_workflow(candidate):
                continue
            found.append(candidate)
    return found

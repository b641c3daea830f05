"""Which files are workflows: named files always; in a directory, only the files that look
like workflows, so a repository's CI configuration (`.github/workflows`),
`docker-compose.yml`, Helm charts or `fusion test` cases (`*.test.yaml`) are neither
reported as broken workflows by `fusion validate` nor loaded by the server."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from fnmatch import fnmatch
from pathlib import Path, PurePosixPath

from engine.dsl.issues import WorkflowInvalid
from engine.dsl.source import load_file

WORKFLOW_SUFFIXES = (".yaml", ".yml", ".json")

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


def candidates(directory: Path) -> list[Path]:
    """The *.yaml, *.yml and *.json files below `directory`, hidden files and directories
    skipped, in sorted order: the cheap listing, without reading any file."""
    found: list[Path] = []
    for candidate in sorted(directory.rglob("*")):
        relative = candidate.relative_to(directory)
        if any(part.startswith(".") for part in relative.parts):
            continue
        if candidate.suffix in WORKFLOW_SUFFIXES and candidate.is_file():
            found.append(candidate)
    return found


def files_to_check(paths: Iterable[str | Path], exclude: Sequence[str] = ()) -> list[Path]:
    """Named files as given (a missing one is the caller's to report); directories
    searched for their candidates that look like workflows."""
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if not path.is_dir():
            if not excluded(path, exclude):
                found.append(path)
            continue
        found.extend(
            candidate
            for candidate in candidates(path)
            if not excluded(candidate, exclude, path) and looks_like_workflow(candidate)
        )
    return found

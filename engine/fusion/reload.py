"""Hot reload of the workflows directory: while the engine runs, its files are looked at
every `workflows_reload_interval_s` seconds (modification time and size, no new dependency)
and the catalog follows them.

- A new or changed file that compiles is added, or replaces the version loaded from it.
- A file that does not compile is logged (`workflow_reload_failed`, every issue as
  file:line:col) and changes nothing: the version loaded before stays. It is read again
  once it changes again.
- A deleted file's workflow is removed (`workflow_removed`, naming any workflows that still
  call it: their `workflow` steps will then fail as calls to an unknown id do).
- Composed workflows (the API's) are never replaced or removed: a file taking a composed
  workflow's id is refused like a file that does not compile.

Files are compiled on a worker thread; the catalog changes in one step on the event loop,
and a run holds the compiled workflow it started with, so a reload never changes a run in
flight. A `workflow` step names its callee by id and finds the version loaded when it runs.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import structlog

from engine.dsl.catalog import WorkflowCatalog, compile_each
from engine.dsl.compiled import CompiledWorkflow
from engine.dsl.discovery import candidates, looks_like_workflow
from engine.dsl.issues import Issue
from engine.fusion.composed import callers_of

log = structlog.get_logger(__name__)

Stamp = tuple[int, int]  # modification time (ns), size


def scan(directory: Path) -> dict[Path, Stamp]:
    """The candidate files under `directory` (engine.dsl.discovery: none is read) with
    their stamps; none when it is missing."""
    stamps: dict[Path, Stamp] = {}
    if not directory.is_dir():
        return stamps
    for path in candidates(directory):
        with contextlib.suppress(OSError):  # deleted between the listing and the stat
            info = path.stat()
            stamps[path] = (info.st_mtime_ns, info.st_size)
    return stamps


@dataclass
class Look:
    """What changed since the last look: every file's stamp now, the files gone, and each
    new or changed file's compiled workflow or issues."""

    stamps: dict[Path, Stamp]
    removed: list[Path]
    results: dict[Path, CompiledWorkflow | list[Issue]]


class WorkflowReloader:
    """Loads the workflows directory into the catalog, then follows its changes."""

    def __init__(self, catalog: WorkflowCatalog, directory: Path, interval_s: float) -> None:
        self.catalog = catalog
        self.directory = directory
        self.interval_s = interval_s
        self._stamps: dict[Path, Stamp] = {}
        self._ids: dict[Path, str] = {}  # the workflow id each loaded file defines
        self._task: asyncio.Task[None] | None = None

    def load(self) -> None:
        """The first load: any invalid file fails it (WorkflowInvalid), as a server must
        not start without a workflow it was given."""
        # Stamped before reading: a file written during the load is seen as changed.
        self._stamps = scan(self.directory)
        if self.directory.is_dir():
            self.catalog.load_directory(self.directory)
        self._ids = {
            Path(wf.file): wf.id
            for wf in self.catalog
            if wf.file is not None and Path(wf.file) in self._stamps
        }

    def start(self) -> None:
        if self.interval_s > 0 and self._task is None:
            self._task = asyncio.create_task(self._poll(), name="workflow-reload")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.reload()
            except Exception as exc:  # the next look may succeed; the task must live on
                log.error("workflow_reload_error", directory=str(self.directory), exc_info=exc)

    async def reload(self) -> None:
        """Look at the directory once and bring the catalog up to date with it."""
        look = await asyncio.to_thread(
            self._look, dict(self._stamps), dict(self._ids), self.catalog.ids()
        )
        if look is not None:
            self._apply(look)

    def _look(
        self, before: dict[Path, Stamp], ids: dict[Path, str], catalog_ids: frozenset[str]
    ) -> Look | None:
        """On a worker thread, from snapshots: it reads no state the event loop changes."""
        stamps = scan(self.directory)
        changed = [path for path, stamp in stamps.items() if before.get(path) != stamp]
        removed = [path for path in before if path not in stamps]
        # A file loaded before is compiled whatever it looks like now, so a broken edit is
        # reported (and keeps the loaded version) rather than silently ignored.
        changed = [path for path in changed if path in ids or looks_like_workflow(path)]
        if not changed and not removed:
            return Look(stamps, [], {}) if stamps != before else None
        leaving = {ids[p] for p in (*changed, *removed) if p in ids}
        taken = {wf_id: path for path, wf_id in ids.items() if wf_id not in leaving}
        results = compile_each(
            changed, self.catalog.registry, extra_ids=catalog_ids - leaving, taken=taken
        )
        return Look(stamps, removed, results)

    def _apply(self, look: Look) -> None:
        """On the event loop, in one step: composing cannot interleave with it."""
        owned = set(self._ids.values())
        ids = dict(self._ids)
        removed: dict[str, Path] = {}
        for path in look.removed:
            if (wf_id := ids.pop(path, None)) is not None:
                removed[wf_id] = path
        added: list[tuple[Path, CompiledWorkflow]] = []
        for path, result in look.results.items():
            if not isinstance(result, list) and result.id in self.catalog.ids() - owned:
                message = (
                    f"workflow id '{result.id}' is a composed workflow's: delete it through "
                    "the API (DELETE /api/fusion/workflows/{id}) or choose another id"
                )
                result = [Issue(message, ("id",), str(path))]
            if isinstance(result, list):
                log.error(
                    "workflow_reload_failed",
                    file=str(path),
                    kept=ids.get(path),  # the version still served, if one was loaded
                    errors=[issue.text() for issue in result],
                )
                continue
            previous = ids.get(path)
            if previous is not None and previous != result.id:
                removed[previous] = path  # the file now defines another id
            # A file changed at the same time, and failing, may still hold this id.
            ids = {p: i for p, i in ids.items() if i != result.id}
            ids[path] = result.id
            added.append((path, result))
        for _, wf in added:
            removed.pop(wf.id, None)  # moved to another file, not gone
        self.catalog.update(add=[wf for _, wf in added], remove=removed)
        self._ids = ids
        self._stamps = look.stamps
        self._log_changes(added, removed.items())

    def _log_changes(
        self, added: list[tuple[Path, CompiledWorkflow]], removed: Iterable[tuple[str, Path]]
    ) -> None:
        for path, wf in added:
            log.info("workflow_reloaded", workflow_id=wf.id, file=str(path), version=wf.version)
        for wf_id, path in removed:
            if callers := callers_of(wf_id, self.catalog):
                log.warning(
                    "workflow_removed", workflow_id=wf_id, file=str(path), called_by=callers
                )
            else:
                log.info("workflow_removed", workflow_id=wf_id, file=str(path))

"""Composed (custom) workflows: validated in full, then stored in SQLite with a version
number per name, loaded into the workflow catalog (latest version) at start-up.

- A compose body is a workflow document (the same DSL as the YAML files, as JSON). Its
  id is `id`, else `name`. Everything is checked before anything is stored; every issue
  is reported with a JSON pointer into the body (400 `invalid_workflow`).
- A name taken by a predefined workflow is a 409; composing an existing custom name
  stores version n+1 and makes it the one that runs. Version numbers are never reused,
  not even after a delete, so a run's recorded version always names one definition.
- Delete marks every version deleted (rows stay, for the runs that used them).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import msgspec
import structlog

from engine.clock import utc_iso
from engine.dsl.catalog import WorkflowCatalog
from engine.dsl.compiled import CompiledWorkflow
from engine.dsl.compiler import compile_document
from engine.dsl.issues import Issue, WorkflowInvalid
from engine.dsl.schema import WORKFLOW_KEYS
from engine.dsl.source import from_object
from engine.errors import Conflict, ErrorCode, NotFound
from engine.steps.registry import StepRegistry
from engine.store import Store, register_migration

log = structlog.get_logger(__name__)

# The orchestrate request's `workflow: "custom"` means "the definition in this request".
RESERVED_IDS = frozenset({"custom"})
_ID_PATTERN = re.compile(WORKFLOW_KEYS["id"]["pattern"])

register_migration(
    3,
    "composed_workflows",
    """
    CREATE TABLE composed_workflows (
        workflow_id TEXT NOT NULL,
        version INTEGER NOT NULL,
        name TEXT NOT NULL,
        description TEXT NOT NULL DEFAULT '',
        definition TEXT NOT NULL CHECK (json_valid(definition)),
        created_at TEXT NOT NULL,
        deleted_at TEXT,
        PRIMARY KEY (workflow_id, version)
    ) STRICT;
    """,
)


@dataclass(frozen=True)
class ComposedInfo:
    workflow_id: str
    name: str
    version: int
    created_at: str


def composed_id(body: dict[str, Any]) -> tuple[str | None, list[Issue]]:
    """The id a compose body names (`id`, else `name`), and what is wrong with it."""
    wf_id, name = body.get("id"), body.get("name")
    if wf_id is not None:
        # The DSL schema checks `id` itself (any JSON may be here); only the reserved
        # word is ours to refuse.
        if isinstance(wf_id, str) and wf_id in RESERVED_IDS:
            return None, [_reserved(wf_id, ("id",))]
        return (wf_id if isinstance(wf_id, str) else None), []
    if name is None:
        return None, [
            Issue("a composed workflow needs a 'name' (its id, unless an 'id' is given)", ())
        ]
    if not isinstance(name, str):
        return None, []  # the DSL schema reports the type
    if not _ID_PATTERN.match(name):
        return None, [
            Issue(
                f"{name!r} cannot be the workflow id: use letters, digits, '_', '.' and '-', "
                "not starting with '.' or '-', or give a separate 'id'",
                ("name",),
            )
        ]
    if name in RESERVED_IDS:
        return None, [_reserved(name, ("name",))]
    return name, []


def _reserved(wf_id: str, path: tuple[str, ...]) -> Issue:
    return Issue(
        f"'{wf_id}' is reserved (orchestrate's workflow \"custom\" runs an inline definition)",
        path,
    )


def callers_of(target: str, workflows: Iterable[CompiledWorkflow]) -> list[str]:
    """Ids of the workflows whose `workflow` steps (inline ones included) call `target`."""

    def calls(wf: CompiledWorkflow) -> bool:
        for step in wf.steps.values():
            if step.type != "workflow":
                continue
            if step.prepared == target:
                return True
            if isinstance(step.prepared, CompiledWorkflow) and calls(step.prepared):
                return True
        return False

    return sorted(wf.id for wf in workflows if wf.id != target and calls(wf))


class ComposedWorkflows:
    def __init__(self, store: Store, steps: StepRegistry, catalog: WorkflowCatalog) -> None:
        self.store = store
        self.steps = steps
        self.catalog = catalog
        self.active: dict[str, ComposedInfo] = {}

    @property
    def predefined(self) -> frozenset[str]:
        """Every workflow of the catalog that is not composed: the workflows directory's
        files, as loaded now (they are reloaded while the server runs)."""
        return self.catalog.ids() - self.active.keys()

    # -- start-up -------------------------------------------------------------------------
    def load(self) -> None:
        """Add the latest live version of every composed workflow to the catalog. One that
        no longer compiles (a step plugin was uninstalled, a predefined workflow now has
        its name) is logged and left out, never fatal: the server still starts."""
        rows = self.store.query(
            """
            SELECT workflow_id, version, name, definition, created_at
            FROM composed_workflows AS c
            WHERE deleted_at IS NULL
              AND version = (SELECT max(version) FROM composed_workflows
                             WHERE workflow_id = c.workflow_id)
            ORDER BY workflow_id
            """
        )
        known = self.predefined | {row[0] for row in rows}
        for wf_id, version, name, definition, created_at in rows:
            if wf_id in self.predefined:
                log.warning("composed_workflow_shadowed", workflow_id=wf_id, version=version)
                continue
            try:
                compiled = self._compile(msgspec.json.decode(definition), wf_id, known)
            except WorkflowInvalid as exc:
                log.error(
                    "composed_workflow_invalid",
                    workflow_id=wf_id,
                    version=version,
                    issues=[i.to_dict() for i in exc.issues],
                )
                continue
            self._activate(compiled, ComposedInfo(wf_id, name, version, created_at))

    # -- compose / delete -----------------------------------------------------------------
    def compose(self, body: dict[str, Any]) -> ComposedInfo:
        wf_id, issues = composed_id(body)
        known = self.catalog.ids() | ({wf_id} if wf_id else set())
        compiled = None
        try:
            compiled = self._compile(body, wf_id, known)
        except WorkflowInvalid as exc:
            issues += exc.issues
        if issues or compiled is None or wf_id is None:
            raise WorkflowInvalid(issues or [Issue("invalid workflow", ())])
        if wf_id in self.predefined:
            raise Conflict(
                f"workflow '{wf_id}' is a predefined workflow; choose another name",
                param="name" if "id" not in body else "id",
                code=ErrorCode.WORKFLOW_EXISTS,
            )
        created_at = utc_iso()
        stored = {**body, "version": 0}  # the version is set below, inside the transaction
        with self.store.transaction() as conn:
            rows: list[tuple[Any, ...]] = conn.execute(
                "SELECT coalesce(max(version), 0) FROM composed_workflows WHERE workflow_id = ?",
                (wf_id,),
            ).fetchall()
            version = int(rows[0][0]) + 1
            stored["version"] = version
            conn.execute(
                "INSERT INTO composed_workflows (workflow_id, version, name, description, "
                "definition, created_at) VALUES (?, ?, ?, ?, ?, ?)",
                (
                    wf_id,
                    version,
                    compiled.name,
                    compiled.description,
                    msgspec.json.encode(stored).decode(),
                    created_at,
                ),
            )
        compiled.version = version
        compiled.definition = stored
        info = ComposedInfo(wf_id, compiled.name, version, created_at)
        self._activate(compiled, info)
        log.info("workflow_composed", workflow_id=wf_id, version=version)
        return info

    def delete(self, wf_id: str) -> ComposedInfo:
        info = self.active.get(wf_id)
        if info is None:
            if wf_id in self.catalog.ids():
                raise Conflict(
                    f"workflow '{wf_id}' is predefined (a file in the workflows directory) "
                    "and cannot be deleted through the API",
                    param="workflow_id",
                    code=ErrorCode.WORKFLOW_PREDEFINED,
                )
            raise NotFound(
                f"workflow '{wf_id}' not found",
                param="workflow_id",
                code=ErrorCode.INVALID_WORKFLOW,
            )
        callers = callers_of(wf_id, self.catalog)
        if callers:
            raise Conflict(
                f"workflow '{wf_id}' is called by {', '.join(callers)}; delete or change "
                "those first",
                param="workflow_id",
                code=ErrorCode.WORKFLOW_IN_USE,
            )
        with self.store.transaction() as conn:
            conn.execute(
                "UPDATE composed_workflows SET deleted_at = ? "
                "WHERE workflow_id = ? AND deleted_at IS NULL",
                (utc_iso(), wf_id),
            )
        del self.active[wf_id]
        self.catalog.remove(wf_id)
        log.info("workflow_deleted", workflow_id=wf_id, version=info.version)
        return info

    # -- helpers --------------------------------------------------------------------------
    def _compile(
        self, body: dict[str, Any], wf_id: str | None, known: Iterable[str]
    ) -> CompiledWorkflow:
        return compile_document(from_object(body), self.steps, workflow_ids=known, default_id=wf_id)

    def _activate(self, compiled: CompiledWorkflow, info: ComposedInfo) -> None:
        compiled.version = info.version
        self.catalog.add(compiled)
        self.active[info.workflow_id] = info

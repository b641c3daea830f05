"""The models `fusion test` loads for the cases that name one (`echo`, or a model directory
relative to the test file): one in-process engine per invocation, started when a case first
needs it, each model loaded once and shared by the cases that name it.

The engine is hermetic: its data lives in a temporary directory and no start-up model is
loaded or fills a role, so a case runs on the models it names and nothing else (a role it
leaves unbound is a case error, as is a model that cannot load)."""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from engine.config import Settings
from engine.dsl.catalog import WorkflowCatalog
from engine.dsl.compiled import CompiledWorkflow
from engine.runtime.executor import Runner
from engine.runtime.local_models import ECHO, SpecKey, calls_models, load_models, plan_models

if TYPE_CHECKING:
    from engine.services import Engine

log = structlog.get_logger(__name__)


def _log_line(line: str) -> None:
    log.info("test_model", message=line)


def case_given(role: str, value: str) -> str:
    """How a test case names a model for a role, in messages."""
    return f"models: {{{role}: {value}}}"


def to_load(models: Mapping[str, str], base: Path) -> dict[str, str]:
    """The roles of a case's `models` that name a model to load, directories made relative
    to the working directory (they are written relative to the test file)."""
    found = {}
    for role, value in models.items():
        if value == ECHO:
            found[role] = value
        elif (base / value).is_dir():
            found[role] = str(base / value)
    return found


class CaseModels:
    """The engine that loads the cases' models, and what it has loaded. `say` is told a
    line as each model loads (fusion test writes them on stderr, as fusion run does)."""

    def __init__(self, say: Callable[[str], None] = _log_line) -> None:
        self.say = say
        self._engine: Engine | None = None
        self._data_dir: tempfile.TemporaryDirectory[str] | None = None
        self._loaded: dict[SpecKey, str] = {}

    @staticmethod
    def needed(
        models: Mapping[str, str],
        base: Path,
        wf: CompiledWorkflow,
        mocks: Mapping[str, Any],
        catalog: WorkflowCatalog,
    ) -> bool:
        """Whether a case loads models: it names one, and an unmocked step calls a model
        (else, as in fusion run, its values are bound as labels and nothing loads)."""
        return bool(to_load(models, base)) and calls_models(wf, mocks, catalog)

    async def runner(
        self,
        models: Mapping[str, str],
        base: Path,
        wf: CompiledWorkflow,
        mocks: Mapping[str, Any],
        catalog: WorkflowCatalog,
    ) -> tuple[Runner, dict[str, str]]:
        """A runner on the engine's models with `catalog`'s workflows, and role -> the
        model id bound to it; a FusionError when a role needed has no model, or a model
        cannot load or serve its role."""
        given = {**models, **to_load(models, base)}
        settings = Settings(startup_models=[])
        plan = plan_models(wf, mocks, catalog, given, settings, hermetic=True, given_as=case_given)
        engine = await self._start()
        ids = await load_models(engine, plan, self.say, self._loaded)
        assert engine.fusion is not None
        engine.fusion.check_models(wf, {r: ids[r] for r in plan.given})
        # No model selector: a role is bound to the model the case names, not to whatever
        # another case loaded.
        return Runner(catalog=catalog, services=engine.runner.services), ids

    async def _start(self) -> Engine:
        if self._engine is None:
            from engine.services import Engine  # the model stack, for cases that need it

            self._data_dir = tempfile.TemporaryDirectory(prefix="fusion-test-")
            settings = Settings(data_dir=Path(self._data_dir.name), startup_models=[])
            self.say("starting an engine for the cases' models")
            self._engine = await Engine.start(settings, load_workflows=False)
        return self._engine

    async def close(self) -> None:
        if self._engine is not None:
            await self._engine.stop()
            self._engine = None
        if self._data_dir is not None:
            self._data_dir.cleanup()
            self._data_dir = None
        self._loaded.clear()

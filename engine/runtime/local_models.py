"""The models an in-process run loads (`fusion run`, and `fusion test` for a case that
names models to load), and loading them.

Models are loaded only for a run that calls one: an unmocked step whose type uses a model
(model_call, vector_search, rerank, chunk), in the workflow or one it calls. Then every
required role needs a model when nothing is mocked (the runner binds them all), else only
the roles that unmocked steps read (``{{ models.ROLE }}``); a workflow the run calls needs
its own required roles, inherited by name from the caller or else picked by type.

`--model ROLE=VALUE` names the model for a role (a model directory loaded as the role's
type, `echo`, or a start-up model's id); every other type needed is filled by the first
start-up model of that type (fusion.yaml's `startup_models`, else the demo setup). Nothing
else is loaded. A hermetic plan (`fusion test`) uses no start-up model: a value that is no
model to load is bound as is, and a type needed that no given model fills is an error.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.config import Settings
from engine.dsl.catalog import WorkflowCatalog
from engine.dsl.compiled import CompiledWorkflow
from engine.dsl.hints import suggest
from engine.dsl.lint.base import templates
from engine.errors import FusionError, InvalidRequest, ServiceUnavailable
from engine.models.types import LoadSpec, ModelType
from engine.runtime.executor import check_mocks

if TYPE_CHECKING:
    from engine.services import Engine

ECHO = ModelType.ECHO.value
SpecKey = tuple[str, str, str | None]  # (model_path, model_type, model_id): one model to load


def cli_given(role: str, value: str) -> str:
    """How `fusion run` names a model given for a role, in its messages."""
    return f"--model {role}={value}"


@dataclass
class ModelPlan:
    """role -> the model given for it; model type -> the start-up model filling it; role ->
    a value bound as is (a hermetic plan's value that names no model to load)."""

    given: dict[str, LoadSpec] = field(default_factory=dict)
    by_type: dict[str, LoadSpec] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)

    def specs(self) -> list[LoadSpec]:
        """Each model to load, once."""
        unique: dict[SpecKey, LoadSpec] = {}
        for spec in [*self.given.values(), *self.by_type.values()]:
            unique.setdefault(spec_key(spec), spec)
        return list(unique.values())


def spec_key(spec: LoadSpec) -> SpecKey:
    return (spec.model_path, spec.model_type, spec.model_id)


def calls_models(
    wf: CompiledWorkflow,
    mocks: Mapping[str, Any],
    catalog: WorkflowCatalog,
    calling: frozenset[str] = frozenset(),
) -> bool:
    """Whether a step that runs (not mocked; in `wf` or a workflow it calls) calls a
    model. A run that calls none binds roles to the names given, as labels."""
    if any(s.plugin.model_param and s.id not in mocks for s in wf.steps.values()):
        return True
    return any(
        calls_models(child, {}, catalog, calling | {wf.id})
        for child in _callees(wf, mocks, catalog, calling)
    )


def needed_roles(
    wf: CompiledWorkflow,
    mocks: Mapping[str, Any],
    catalog: WorkflowCatalog,
    calling: frozenset[str] = frozenset(),
) -> tuple[set[str], set[str]]:
    """(roles of `wf` whose models the run uses, model types the workflows it calls need
    for roles they do not inherit from it)."""
    required = {role for role, spec in wf.models.items() if not spec.optional}
    if not mocks:
        roles = set(required)
    else:  # the runner binds leniently: only what a running step reads is needed
        roles = set()
        for located in templates(wf):
            if located.step is None or located.step in mocks:
                continue
            for ref in located.template.references:
                if ref.root == "models":
                    roles |= {str(ref.path[0])} if ref.path else set(wf.models)
        roles &= required
    types: set[str] = set()
    for child in _callees(wf, mocks, catalog, calling):
        child_roles, child_types = needed_roles(child, {}, catalog, calling | {wf.id})
        types |= child_types
        for role in child_roles:
            if role in required:
                roles.add(role)  # the child inherits the caller's binding
            else:
                types.add(child.models[role].type)
    return roles, types


def _callees(
    wf: CompiledWorkflow,
    mocks: Mapping[str, Any],
    catalog: WorkflowCatalog,
    calling: frozenset[str],
) -> list[CompiledWorkflow]:
    """The workflows that unmocked `workflow` steps of `wf` call, but not one already
    being walked (a recursive call needs nothing more); an unknown id fails at run time."""
    found = []
    for step in wf.steps.values():
        if step.type != "workflow" or step.id in mocks:
            continue
        child = step.prepared
        if isinstance(child, str):
            child = catalog.get(child) if child in catalog.ids() else None
        if isinstance(child, CompiledWorkflow) and child.id not in calling | {wf.id}:
            found.append(child)
    return found


class StartupModels:
    """The configured start-up models' load bodies, read once when first needed (the demo
    setup builds its chat model's files)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._bodies: list[dict[str, Any]] | None = None

    @property
    def bodies(self) -> list[dict[str, Any]]:
        if self._bodies is None:
            from engine.services import demo_models

            configured = self.settings.startup_models
            self._bodies = (
                configured
                if configured is not None
                else demo_models(self.settings.data_dir / "models")
            )
        return self._bodies

    def by_id(self, model_id: str) -> LoadSpec | None:
        for body in self.bodies:
            if model_id in (body.get("model_id"), body.get("model_path")):
                return LoadSpec(**body)
        return None

    def of_type(self, model_type: str) -> LoadSpec | None:
        for body in self.bodies:
            if body.get("model_type") == model_type:
                return LoadSpec(**body)
        return None

    def ids(self) -> list[str]:
        return [str(b.get("model_id") or b.get("model_path")) for b in self.bodies]


def plan_models(
    wf: CompiledWorkflow,
    mocks: Mapping[str, Any],
    catalog: WorkflowCatalog,
    given: Mapping[str, str],
    settings: Settings,
    *,
    hermetic: bool = False,
    given_as: Callable[[str, str], str] = cli_given,
) -> ModelPlan:
    """What to load for a run of `wf`; a usage error before anything loads when a mock
    names no step, a role given is not the workflow's, a value names no model, or a type
    needed has none. `hermetic`: no start-up model is used (see the module's doc);
    `given_as(role, value)` names a given model in messages."""
    check_mocks(wf, mocks)  # before anything loads
    startup = None if hermetic else StartupModels(settings)
    plan = ModelPlan()
    for role, value in given.items():
        spec = wf.models.get(role)
        if spec is None:
            declared = ", ".join(wf.models) or "none"
            raise InvalidRequest(
                f"{given_as(role, '...')}: workflow '{wf.id}' has no model role '{role}'"
                f"{suggest(role, wf.models)} (roles: {declared})",
                param="model",
            )
        found = _given_spec(role, value, spec.type, startup, given_as)
        if found is None:
            plan.labels[role] = value
        else:
            plan.given[role] = found
    roles, types = needed_roles(wf, mocks, catalog)
    types |= {wf.models[role].type for role in roles if role not in given}
    if startup is not None:  # a role left to the runner gets a loaded model of its type
        types -= {spec.model_type for spec in plan.given.values()}
    for model_type in sorted(types):
        found = startup.of_type(model_type) if startup is not None else None
        if found is None:
            wanting = sorted(r for r in roles - set(given) if wf.models[r].type == model_type) or [
                "..."
            ]
            elsewhere = (
                f", or list a '{model_type}' model in startup_models (fusion.yaml)"
                if startup is not None
                else f", or mock the steps that use role '{wanting[0]}'"
            )
            raise ServiceUnavailable(
                f"no '{model_type}' model to run '{wf.id}': pass "
                f"{given_as(wanting[0], 'DIR')} (a model directory), "
                f"{given_as(wanting[0], ECHO)}{elsewhere}",
                param="model",
            )
        plan.by_type[model_type] = found
    return plan


def _given_spec(
    role: str,
    value: str,
    role_type: str,
    startup: StartupModels | None,
    given_as: Callable[[str, str], str],
) -> LoadSpec | None:
    """The model to load for a value given; None: a hermetic plan binds it as is."""
    if value == ECHO:
        return LoadSpec(model_path=ECHO, model_type=ECHO, model_id=ECHO)
    if Path(value).expanduser().is_dir():
        return LoadSpec(model_path=value, model_type=role_type)
    if startup is None:
        return None
    found = startup.by_id(value)
    if found is None:
        ids = startup.ids()
        raise InvalidRequest(
            f"{given_as(role, value)}: not a model directory, '{ECHO}', or a start-up model"
            f"{suggest(value, ids)} (start-up models: {', '.join(ids) or 'none'})",
            param="model",
        )
    return found


async def load_models(
    engine: Engine,
    plan: ModelPlan,
    say: Callable[[str], None],
    loaded: dict[SpecKey, str] | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> dict[str, str]:
    """Load the plan's models, telling `say` a line each; role -> id of each given role
    (and the plan's labels). `loaded` (spec -> id) holds the models an earlier plan loaded
    on the same engine: they are not loaded again, and those loaded now join it."""
    ids = loaded if loaded is not None else {}
    for spec in plan.specs():
        if spec_key(spec) in ids:
            continue
        say(f"loading {spec.model_type} model {spec.model_id or spec.model_path}")
        started = clock()
        try:
            entry = await engine.models.load(spec)
        except FusionError:
            say(f"cannot load {spec.model_path} as a {spec.model_type} model:")
            raise
        say(f"loaded '{entry.id}' ({entry.type}) in {clock() - started:.1f} s")
        ids[spec_key(spec)] = entry.id
    return {
        **plan.labels,
        **{role: ids[spec_key(spec)] for role, spec in plan.given.items()},
    }

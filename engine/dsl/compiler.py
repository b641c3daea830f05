"""Static validation and compilation: a loaded document becomes a CompiledWorkflow
(engine.dsl.compiled: steps with compiled templates and a networkx DAG), or WorkflowInvalid
listing every issue found. Each check is a method of one concern (check_*), run in an order
that reports every issue; types are checked by engine.dsl.typecheck."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import networkx as nx
from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError, best_match

from engine.dsl.compiled import (
    DEFAULT_CONCURRENCY,
    CompiledStep,
    CompiledWorkflow,
    RepeatSpec,
    RetrySpec,
    RoleSpec,
)
from engine.dsl.hints import suggest
from engine.dsl.input_schema import schema_issues
from engine.dsl.issues import Issue, Path, WorkflowInvalid
from engine.dsl.schema import (
    IDENTIFIER,
    STEP_KEYS,
    TEMPLATE,
    WORKFLOW_KEYS,
    WORKFLOW_SCHEMA,
    step_schema,
)
from engine.dsl.source import Document
from engine.dsl.templating import Template, TemplateCompileError
from engine.dsl.typecheck import WorkflowChecker, base_names
from engine.dsl.types import Type
from engine.dsl.values import DictValue, Literal, TemplateValue, Value, compile_value
from engine.steps.base import CheckContext, StepPlugin
from engine.steps.registry import StepRegistry

BASE_NAMES = frozenset({"input", "config", "models", "steps"})
STEP_ATTRIBUTES = ("output", "status", "ran", "error", "attempts", "iterations", "until_met")
# What a step's state reveals about a skipped dependency: reading it means the step
# handles the skip itself, so the skip does not propagate to it.
GUARD_ATTRIBUTES = frozenset({"ran", "status"})
_META_VALIDATOR = Draft202012Validator(
    Draft202012Validator.META_SCHEMA, format_checker=Draft202012Validator.FORMAT_CHECKER
)
Refs = set[tuple[str, str | None]]  # (step id, attribute read or None) of templates


class _Compiler:
    def __init__(
        self,
        doc: Document,
        registry: StepRegistry,
        workflow_ids: frozenset[str] | None,
        base: Path,
        data: Any,
    ) -> None:
        self.doc = doc
        self.registry = registry
        self.workflow_ids = workflow_ids
        self.base = base
        self.data = data
        self.issues: list[Issue] = []

    # -- reporting ---------------------------------------------------------------------
    def report(self, message: str, path: Path, *, at_key: bool = False) -> None:
        self.issues.append(self.doc.issue(message, (*self.base, *path), at_key=at_key))

    def report_template(self, path: Path, exc: TemplateCompileError) -> None:
        where = f" (template line {exc.lineno})" if exc.lineno and exc.lineno > 1 else ""
        self.report(f"{exc.message}{where}", path)

    def report_schema(self, error: ValidationError, path: Path) -> None:
        where = (*path, *error.absolute_path)
        if error.validator == "additionalProperties" and isinstance(error.instance, dict):
            # Nested objects (retry, repeat, a model role): name each unknown key where it
            # is written, with a suggestion, as for the keys of a step.
            owner = f"in '{where[-1]}'" if where else "here"
            self.unknown_keys(error.instance, error.schema.get("properties", {}), where, owner)
            return
        if "propertyNames" in error.schema_path and isinstance(error.instance, str):
            # The offending thing is the key itself, not the mapping holding it.
            self.report(_describe(error), (*where, error.instance), at_key=True)
            return
        self.report(_describe(error), where)

    def unknown_keys(
        self, obj: Mapping[str, Any], known: Iterable[str], path: Path, owner: str
    ) -> None:
        known = list(known)
        for key in obj:
            if key not in known:
                allowed = ", ".join(known)
                self.report(
                    f"unknown key '{key}' {owner}{suggest(key, known)}; allowed: {allowed}",
                    (*path, key),
                    at_key=True,
                )

    # -- the document --------------------------------------------------------------------
    def compile(self, default_id: str | None) -> CompiledWorkflow | None:
        data = self.data
        if not isinstance(data, dict):
            self.report("a workflow must be a mapping with a 'steps' list", ())
            return None
        self.check_workflow_keys(data)
        models = _role_specs(data.get("models"))
        input_schema = data.get("input_schema") or {"type": "object"}
        output_schema = data.get("output_schema")
        self.check_json_schema("input_schema", input_schema)
        self.check_json_schema("output_schema", output_schema)
        raw_steps = data.get("steps")
        steps_data: list[Any] = raw_steps if isinstance(raw_steps, list) else []
        ids = self.check_unique_ids(steps_data)
        steps: dict[str, CompiledStep] = {}
        for index, raw in enumerate(steps_data):
            step = self.compile_step(raw, ("steps", index), ids, models)
            if step is not None and step.id not in steps:
                steps[step.id] = step
        output = None
        if "output" in data:
            output = self.compile_with_refs(
                data["output"], ("output",), BASE_NAMES, ids, models, None
            )[0]
        graph = _dependency_graph(steps)
        self.check_cycles(graph, ids)
        output_type = self.check_types(
            data,
            steps,
            ids,
            models,
            graph,
            output,
            output_schema if isinstance(output_schema, dict) else None,
        )
        if self.issues:
            return None
        wf_id = data.get("id") or default_id or data.get("name") or "workflow"
        return CompiledWorkflow(
            id=str(wf_id),
            name=str(data.get("name") or wf_id),
            description=str(data.get("description") or ""),
            version=data.get("version"),
            models=models,
            input_schema=input_schema,
            config=dict(data.get("config") or {}),
            steps=steps,
            graph=graph,
            output=output,
            definition=data,
            file=self.doc.file,
            output_schema=output_schema,
            output_type=output_type,
        )

    def check_workflow_keys(self, data: dict[str, Any]) -> None:
        """Top-level keys: each known, each value of its schema."""
        self.unknown_keys(data, WORKFLOW_KEYS, (), "in a workflow")
        for error in Draft202012Validator(WORKFLOW_SCHEMA).iter_errors(data):
            where = tuple(error.absolute_path)
            if len(where) == 2 and where[0] == "steps" and error.validator == "type":
                continue  # a step that is no mapping: check_step_head says what a step is
            self.report_schema(error, ())

    def check_json_schema(self, key: str, schema: Any) -> None:
        """input_schema / output_schema: a valid JSON Schema the engine can apply."""
        if not isinstance(schema, dict):
            return
        # Every violation of the meta-schema, not just the best one check_schema raises.
        for error in _META_VALIDATOR.iter_errors(schema):
            self.report(
                f"{key} is not a valid JSON Schema: {_describe(error)}",
                (key, *error.absolute_path),
            )
        for message, where in schema_issues(schema):
            self.report(message, (key, *where))

    def check_unique_ids(self, steps: list[Any]) -> dict[str, int]:
        """Step id -> index of the step defining it first; a duplicate is reported."""
        ids: dict[str, int] = {}
        for index, raw in enumerate(steps):
            if not isinstance(raw, dict):
                continue
            sid = raw.get("step_id")
            if not isinstance(sid, str):
                continue
            if sid in ids:
                first = self.doc.values.get((*self.base, "steps", ids[sid], "step_id"))
                at = f" (first defined at line {first[0]})" if first else ""
                self.report(
                    f"duplicate step_id '{sid}'{at}: step ids must be unique",
                    ("steps", index, "step_id"),
                )
            else:
                ids[sid] = index
        return ids

    def check_cycles(self, graph: nx.DiGraph, ids: dict[str, int]) -> None:
        """Each dependency cycle, once, from the step written first."""
        for component in nx.strongly_connected_components(graph):
            if len(component) > 1:
                cycle = [u for u, _ in nx.find_cycle(graph.subgraph(component))]
                first = min(cycle, key=lambda s: ids[s])
                start = cycle.index(first)
                ordered = cycle[start:] + cycle[:start]
                self.report(
                    f"dependency cycle: {' -> '.join([*ordered, first])} (each step "
                    "feeds the next); break it by removing one of these references",
                    ("steps", ids[first], "step_id"),
                )

    def check_types(
        self,
        data: dict[str, Any],
        steps: dict[str, CompiledStep],
        ids: dict[str, int],
        models: dict[str, RoleSpec],
        graph: nx.DiGraph,
        output: Value | None,
        output_schema: dict[str, Any] | None,
    ) -> Type:
        """Type every template in dependency order (engine.dsl.typecheck); the output's
        type. In a cyclic graph, document order: a step read before it is typed is Any."""
        acyclic = nx.is_directed_acyclic_graph(graph)
        order = list(nx.topological_sort(graph)) if acyclic else list(steps)
        roles = {role: spec.optional for role, spec in models.items()}
        checker = WorkflowChecker(base_names(data.get("input_schema"), roles), self.report)
        # A step that failed to compile is in the graph (its edges are checked) but not typed.
        checker.check_steps((steps[sid], ("steps", ids[sid])) for sid in order if sid in steps)
        sinks = [s for s in steps if graph.out_degree(s) == 0]
        return checker.check_output(output, sinks, output_schema)

    # -- steps ---------------------------------------------------------------------------
    def compile_step(
        self, raw: Any, path: Path, ids: dict[str, int], models: dict[str, RoleSpec]
    ) -> CompiledStep | None:
        plugin = self.check_step_head(raw, path)
        if plugin is None:
            return None
        issues_before = len(self.issues)
        self.check_step_keys(raw, plugin, path)
        sid = raw.get("step_id")
        if not isinstance(sid, str):
            return None
        # Templates are still checked below so that every issue is reported, but a step
        # whose keys broke the schema is not built: its control values may be of any type.
        schema_ok = len(self.issues) == issues_before
        self.check_concurrency(raw, path)
        self.check_repeat_with_for_each(raw, path)

        names = _step_names(raw)
        refs: Refs = set()

        def templated(key: str | Path, value: Any, scope: frozenset[str]) -> Value:
            sub = key if isinstance(key, tuple) else (key,)
            compiled, found = self.compile_with_refs(value, (*path, *sub), scope, ids, models, sid)
            refs.update(found)
            return compiled

        param_names = _param_names(plugin)
        raw_params = {k: v for k, v in raw.items() if k in param_names}
        params = {
            k: templated(k, v, names) for k, v in raw_params.items() if k not in plugin.raw_params
        }
        params.update({k: Literal(v) for k, v in raw_params.items() if k in plugin.raw_params})
        when = templated("when", raw["when"], BASE_NAMES) if "when" in raw else None
        for_each = None
        if "for_each" in raw:
            for_each = templated("for_each", raw["for_each"], BASE_NAMES)
            self.check_for_each(raw["for_each"], for_each, (*path, "for_each"))
        repeat = None
        if isinstance(raw.get("repeat"), dict):
            spec = raw["repeat"]
            until = spec.get("until", False)
            repeat = RepeatSpec(
                max=spec.get("max", 1),
                until=templated(("repeat", "until"), until, names | {"output"}),
            )
        deps = self.check_depends_on(raw.get("depends_on"), path, ids, sid)
        deps.update(ref for ref, _ in refs if ref in ids and ref != sid)
        guarded = frozenset(ref for ref, attr in refs if attr in GUARD_ATTRIBUTES)
        default: Value | None = None
        if "default" in raw:
            # Rendered when used (a skip, or a failure with on_error: continue), so the steps
            # it reads must have finished: they are dependencies. Those read only here never
            # skip the step: a skip of what the default reads is the default's to handle.
            default, default_refs = self.compile_with_refs(
                raw["default"], (*path, "default"), BASE_NAMES, ids, models, sid
            )
            read_by_default = {ref for ref, _ in default_refs} - deps
            deps |= read_by_default
            guarded |= read_by_default
        prepared = self.check_plugin_params(plugin, raw_params, path)
        if not schema_ok:
            return None
        raw_retry = raw.get("retry")
        retry: dict[str, Any] = raw_retry if isinstance(raw_retry, dict) else {}
        return CompiledStep(
            id=sid,
            type=plugin.type_name,
            plugin=plugin,
            params=_dict_value(params),
            raw_params=raw_params,
            prepared=prepared,
            when=when,
            for_each=for_each,
            concurrency=int(raw.get("concurrency", DEFAULT_CONCURRENCY)),
            repeat=repeat,
            retry=RetrySpec(**retry),
            timeout_s=raw.get("timeout_s"),
            on_error=raw.get("on_error", "fail"),
            default=default,
            deps=frozenset(deps),
            guarded=guarded & deps,
        )

    def check_step_head(self, raw: Any, path: Path) -> StepPlugin | None:
        """A mapping with a step_id and a known type: the type's plugin, or None."""
        if not isinstance(raw, dict):
            self.report("a step must be a mapping with 'step_id' and 'type'", path)
            return None
        type_name = raw.get("type")
        if raw.get("step_id") is None:
            self.report("missing 'step_id': every step needs a unique id", path)
        if type_name is None:
            self.report("missing 'type': name the step type (e.g. 'template')", path)
            return None
        plugin = self.registry.get(type_name) if isinstance(type_name, str) else None
        if plugin is None:
            known = self.registry.names()
            self.report(
                f"unknown step type '{type_name}'{suggest(str(type_name), known)}; "
                f"known types: {', '.join(known)}",
                (*path, "type"),
            )
        return plugin

    def check_step_keys(self, raw: dict[str, Any], plugin: StepPlugin, path: Path) -> None:
        """The step's keys: each a step key or a parameter of its type, the type's required
        parameters present, each value of its schema."""
        type_name = plugin.type_name
        params_schema = plugin.params_schema
        self.unknown_keys(
            raw, [*STEP_KEYS, *_param_names(plugin)], path, f"for step type '{type_name}'"
        )
        for name in params_schema.get("required", []):
            if name not in raw:
                self.report(f"missing required parameter '{name}' of step type '{type_name}'", path)
        validator = Draft202012Validator(step_schema(params_schema, type_name))
        for error in validator.iter_errors(raw):
            # The step's own unknown keys and missing parameters were reported above, with
            # suggestions; nested objects (retry, repeat) still need the schema's word.
            where = tuple(error.absolute_path)
            if not where and error.validator in ("additionalProperties", "required"):
                continue
            if where == ("for_each",):
                continue  # check_for_each explains what a for_each must be
            self.report_schema(error, path)

    def check_concurrency(self, raw: dict[str, Any], path: Path) -> None:
        if "concurrency" in raw and "for_each" not in raw:
            self.report(
                "'concurrency' bounds for_each items and does nothing without 'for_each'",
                (*path, "concurrency"),
                at_key=True,
            )

    def check_repeat_with_for_each(self, raw: dict[str, Any], path: Path) -> None:
        if "for_each" in raw and "repeat" in raw:
            self.report(
                "'repeat' and 'for_each' cannot be combined on one step: wrap the "
                "repeated part in a 'workflow' step",
                (*path, "repeat"),
                at_key=True,
            )

    def check_depends_on(
        self, depends_on: Any, path: Path, ids: dict[str, int], sid: str
    ) -> set[str]:
        """The steps named in depends_on, each an existing other step."""
        deps: set[str] = set()
        for i, dep in enumerate(depends_on if isinstance(depends_on, list) else []):
            if not isinstance(dep, str):
                continue  # the schema reported it
            if dep == sid:
                self.report("a step cannot depend on itself", (*path, "depends_on", i))
            elif dep not in ids:
                self.report(
                    f"depends_on names unknown step '{dep}'{suggest(dep, ids)}",
                    (*path, "depends_on", i),
                )
            else:
                deps.add(dep)
        return deps

    def check_plugin_params(
        self, plugin: StepPlugin, raw_params: dict[str, Any], path: Path
    ) -> Any:
        """The step type's own checks of its raw parameters; what it prepares from them."""
        checks = CheckContext(
            report=lambda message, sub: self.report(message, (*path, *sub)),
            workflow_ids=self.workflow_ids,
            compile_inline=lambda obj, sub: self.compile_inline(obj, (*path, *sub)),
        )
        plugin.check(raw_params, checks)
        return plugin.prepare(raw_params, checks)

    def compile_inline(self, obj: Any, path: Path) -> CompiledWorkflow | None:
        sub = _Compiler(self.doc, self.registry, self.workflow_ids, (*self.base, *path), obj)
        compiled = sub.compile(default_id=None)
        self.issues.extend(sub.issues)
        return compiled

    # -- references ----------------------------------------------------------------------
    def compile_with_refs(
        self,
        value: Any,
        path: Path,
        names: frozenset[str],
        ids: dict[str, int],
        models: dict[str, RoleSpec],
        self_id: str | None,
    ) -> tuple[Value, Refs]:
        """Compile a value's templates and check every reference they make."""
        found: Refs = set()

        def on_template(tpath: Path, template: Template) -> None:
            for ref in template.references:
                if ref.root == "steps":
                    found.update(self.check_step_ref(ref.path, tpath, ids, self_id))
                elif ref.root == "models" and ref.path:
                    self.check_model_role(ref.path[0], tpath, models)

        value_tree = compile_value(value, path, names, on_template, self.report_template)
        return value_tree, found

    def check_model_role(self, role: str | int, path: Path, models: dict[str, RoleSpec]) -> None:
        if role not in models:
            declared = ", ".join(models) or "none"
            self.report(
                f"undeclared model role '{role}'{suggest(str(role), models)}; "
                f"declare it under 'models:' (declared: {declared})",
                path,
            )

    def check_step_ref(
        self, ref: tuple[str | int, ...], path: Path, ids: dict[str, int], self_id: str | None
    ) -> set[tuple[str, str | None]]:
        if not ref:
            # `steps` alone, or `steps[expr]`: the dependency cannot be known before running.
            self.report(
                "read a step as steps.<step_id>.<attribute> with a literal step id "
                "(not 'steps' alone or steps[expression]): dependencies are derived from it",
                path,
            )
            return set()
        target = str(ref[0])
        if target not in ids:
            self.report(f"reference to unknown step '{target}'{suggest(target, ids)}", path)
            return set()
        if target == self_id:
            self.report(
                f"step '{target}' cannot read its own result; inside 'repeat' use 'previous'", path
            )
            return set()
        attr = ref[1] if len(ref) > 1 else None
        if attr is not None and attr not in STEP_ATTRIBUTES:
            self.report(
                f"step '{target}' has no attribute '{attr}'{suggest(str(attr), STEP_ATTRIBUTES)}"
                f"; a step has {', '.join(STEP_ATTRIBUTES)}",
                path,
            )
            return set()
        return {(target, None if attr is None else str(attr))}

    def check_for_each(self, raw: Any, compiled: Value, path: Path) -> None:
        if isinstance(raw, list):
            return
        if not isinstance(compiled, TemplateValue):
            if not self._reported_at(path):  # a template that did not compile
                # A bare `input.xs` is the usual slip: it is the string "input.xs".
                hint = f" (did you mean '{{{{ {raw} }}}}'?)" if isinstance(raw, str) else ""
                self.report(
                    "for_each must be a list or a single {{ expression }} giving a list, "
                    f"not {raw!r}{hint}",
                    path,
                )
            return
        template = compiled.template
        if not template.native:
            self.report(
                "for_each must be a single {{ expression }} giving a list, not text "
                "around a template (which renders to a string)",
                path,
            )
            return
        # Whether the expression gives a list is the type checker's (engine.dsl.typecheck).

    def _reported_at(self, path: Path) -> bool:
        full = (*self.base, *path)
        return any(i.path == full for i in self.issues)


def _role_specs(models: Any) -> dict[str, RoleSpec]:
    """The declared model roles; a malformed one is the schema's to report."""
    if not isinstance(models, dict):
        return {}
    out = {}
    for role, spec in models.items():
        if isinstance(spec, dict) and isinstance(spec.get("type"), str):
            out[role] = RoleSpec(spec["type"], bool(spec.get("optional", False)))
    return out


def _param_names(plugin: StepPlugin) -> list[str]:
    return list(plugin.params_schema.get("properties", {}))


def _step_names(raw: dict[str, Any]) -> frozenset[str]:
    """The names a step's parameters may read: for_each and repeat add their own."""
    return (
        BASE_NAMES
        | ({"item", "index"} if "for_each" in raw else set())
        | ({"iteration", "previous"} if "repeat" in raw else set())
    )


def _dependency_graph(steps: dict[str, CompiledStep]) -> nx.DiGraph:
    graph = nx.DiGraph()
    graph.add_nodes_from(steps)
    for step in steps.values():
        for dep in step.deps:
            graph.add_edge(dep, step.id)
    return graph


def _dict_value(params: dict[str, Value]) -> Value:
    literals = {k: v.value for k, v in params.items() if isinstance(v, Literal)}
    return Literal(literals) if len(literals) == len(params) else DictValue(params)


# What the DSL's name patterns mean, in words: a bare regex tells the author little.
_PATTERN_HELP = {
    IDENTIFIER: "use letters, digits and '_', not starting with a digit",
    WORKFLOW_KEYS["id"]["pattern"]: "use letters, digits, '_', '.' and '-', "
    "not starting with '.' or '-'",
}


def _describe(error: ValidationError) -> str:
    """A schema error in words: for 'value or template' alternatives, explain the value."""
    if error.validator == "anyOf" and error.context:
        relevant = [
            e
            for e in error.context
            if e.schema is not TEMPLATE and e.schema.get("pattern") != TEMPLATE["pattern"]
        ]
        if relevant:
            inner = best_match(relevant)
            # Only say a template would do when one of the alternatives was the template.
            templatable = len(relevant) < len(error.context)
            return _describe(inner) + (" (or use a {{ template }})" if templatable else "")
    if error.validator == "pattern" and error.validator_value in _PATTERN_HELP:
        return f"{error.instance!r} is not a valid name: {_PATTERN_HELP[error.validator_value]}"
    if error.validator == "minItems" and error.instance == []:
        return "must not be empty"
    if error.validator == "enum":
        allowed = ", ".join(repr(v) for v in error.validator_value)
        return f"{error.instance!r} is not one of {allowed}"
    return error.message


def compile_document(
    doc: Document,
    registry: StepRegistry,
    *,
    workflow_ids: Iterable[str] | None = None,
    default_id: str | None = None,
) -> CompiledWorkflow:
    """Validate and compile; raises WorkflowInvalid with every issue found."""
    compiler = _Compiler(
        doc, registry, frozenset(workflow_ids) if workflow_ids is not None else None, (), doc.data
    )
    compiled = compiler.compile(default_id)
    if compiled is None or compiler.issues:
        issues = compiler.issues or [doc.issue("invalid workflow", ())]
        raise WorkflowInvalid(sorted(issues, key=_issue_order))
    return compiled


def _issue_order(issue: Issue) -> tuple[int, int]:
    return (issue.line or 0, issue.col or 0)

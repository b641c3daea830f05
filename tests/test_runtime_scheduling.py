"""The scheduler: dependencies, concurrency, the parallelism bound, values between steps and
the run's output."""

from __future__ import annotations

import asyncio

from engine_helpers import WAIT_S, Lab, compile_yaml, make_runner, run_yaml, statuses, trace

from engine.runtime.trace import COMPLETED


async def test_a_step_starts_as_soon_as_its_own_dependencies_finish() -> None:
    wf = compile_yaml(
        """
        id: eager
        steps:
          - step_id: slow
            type: gate
          - step_id: fast
            type: record
            value: 1
          - step_id: after_fast
            type: gate
            value: "{{ steps.fast.output + 1 }}"
          - step_id: join
            type: record
            value: "{{ [steps.slow.output, steps.after_fast.output] }}"
        """
    )
    lab = Lab()
    task = asyncio.create_task(make_runner(lab).run(wf))
    # after_fast starts while slow is still blocked: it waits for its own dependency only.
    await lab.wait("started:after_fast")
    assert lab.in_flight == 2
    assert not lab.is_set("finished:slow")
    assert lab.log.index(("end", "fast")) < lab.log.index(("start", "after_fast"))
    assert ("start", "join") not in lab.log
    lab.set("release:after_fast")
    await lab.wait("finished:after_fast")
    assert ("start", "join") not in lab.log  # still waiting for slow
    lab.set("release:slow")
    result = await asyncio.wait_for(task, WAIT_S)
    assert result.status == COMPLETED
    assert lab.log.index(("end", "slow")) < lab.log.index(("start", "join"))
    assert result.output == {"join": ["slow", 2]}


async def test_independent_steps_run_concurrently() -> None:
    # Each step waits for the other's event: they complete only if both run at once.
    result = await run_yaml(
        """
        id: together
        steps:
          - step_id: a
            type: rendezvous
            set: a
            wait: b
          - step_id: b
            type: rendezvous
            set: b
            wait: a
        """
    )
    assert result.status == COMPLETED, result.error
    assert result.output == {"a": "a", "b": "b"}


async def test_max_parallel_bounds_how_many_steps_run_at_once() -> None:
    wf = compile_yaml(
        """
        id: bounded
        steps:
          - {step_id: a, type: gate}
          - {step_id: b, type: gate}
          - {step_id: c, type: gate}
        """
    )
    lab = Lab()
    task = asyncio.create_task(make_runner(lab, max_parallel=2).run(wf))
    await lab.wait("started:a")
    await lab.wait("started:b")
    # Tasks start in creation order, so c would have announced itself by now if it had
    # been started beside a and b.
    assert not lab.is_set("started:c")
    assert lab.in_flight == 2
    lab.set("release:a")
    await lab.wait("started:c")
    lab.set("release:all")
    result = await asyncio.wait_for(task, WAIT_S)
    assert result.status == COMPLETED
    assert lab.max_in_flight == 2
    assert lab.log.index(("end", "a")) < lab.log.index(("start", "c"))


async def test_order_follows_template_references_and_depends_on_not_list_order() -> None:
    lab = Lab()
    result = await run_yaml(
        """
        id: ordered
        steps:
          - step_id: third
            type: record
            value: "{{ steps.second.output }}+3"
          - step_id: second
            type: record
            depends_on: [first]
            value: 2
          - step_id: first
            type: record
            value: 1
        """,
        lab=lab,
    )
    assert result.status == COMPLETED
    assert lab.order("start") == ["first", "second", "third"]
    assert trace(result)["third"].status == COMPLETED
    assert result.output == {"third": "2+3"}


async def test_references_in_when_for_each_and_nested_params_are_dependencies() -> None:
    wf = compile_yaml(
        """
        id: refs
        steps:
          - step_id: guarded
            type: record
            when: "{{ steps.flag.output }}"
            value: yes
          - step_id: mapped
            type: record
            for_each: "{{ steps.items.output }}"
            value: "{{ item }}"
          - step_id: nested
            type: record
            value: {deep: ["{{ steps.items.output[0] }}"]}
          - step_id: flag
            type: record
            value: true
          - step_id: items
            type: record
            value: [x, y]
        """
    )
    assert set(wf.graph.edges) == {
        ("flag", "guarded"),
        ("items", "mapped"),
        ("items", "nested"),
    }
    lab = Lab()
    result = await asyncio.wait_for(make_runner(lab).run(wf), WAIT_S)
    starts = lab.order("start")
    assert starts.index("flag") < starts.index("guarded")
    assert starts.index("items") < starts.index("mapped[0]")
    assert starts.index("items") < starts.index("nested")
    assert result.output == {"guarded": "yes", "mapped": ["x", "y"], "nested": {"deep": ["x"]}}


async def test_native_values_keep_their_type_from_step_to_step() -> None:
    lab = Lab()
    result = await run_yaml(
        """
        id: native
        steps:
          - step_id: source
            type: template
            value: "{{ input.data }}"
          - step_id: as_list
            type: record
            value: "{{ steps.source.output.rows }}"
          - step_id: count
            type: template
            value: "{{ steps.as_list.output | length }}"
          - step_id: flag
            type: template
            value: "{{ steps.source.output.on }}"
          - step_id: text
            type: template
            value: "n={{ steps.count.output }}"
        output:
          items: "{{ steps.as_list.output }}"
          count: "{{ steps.count.output }}"
          flag: "{{ steps.flag.output }}"
          text: "{{ steps.text.output }}"
          nested: {first: "{{ steps.as_list.output[0] }}", literal: [1, 2.5, null]}
        """,
        {"data": {"rows": [{"k": 1}, {"k": 2}], "on": False}},
        lab=lab,
    )
    assert result.status == COMPLETED
    # The plugin itself received a list, not its string rendering.
    assert lab.seen_params == [{"value": [{"k": 1}, {"k": 2}]}]
    assert result.output == {
        "items": [{"k": 1}, {"k": 2}],
        "count": 2,
        "flag": False,
        "text": "n=2",
        "nested": {"first": {"k": 1}, "literal": [1, 2.5, None]},
    }


async def test_default_output_is_the_outputs_of_the_sink_steps() -> None:
    result = await run_yaml(
        """
        id: sinks
        steps:
          - {step_id: root, type: template, value: 1}
          - {step_id: left, type: template, value: "{{ steps.root.output + 1 }}"}
          - {step_id: right, type: template, value: "{{ steps.root.output + 2 }}"}
          - {step_id: alone, type: template, value: solo}
        """
    )
    assert result.output == {"left": 2, "right": 3, "alone": "solo"}


async def test_output_mapping_is_rendered_after_the_steps() -> None:
    result = await run_yaml(
        """
        id: mapped_output
        input_schema:
          type: object
          properties: {name: {type: string}}
        steps:
          - {step_id: greet, type: template, value: "hello {{ input.name }}"}
          - {step_id: shout, type: template, value: "{{ steps.greet.output | upper }}"}
        output:
          greeting: "{{ steps.greet.output }}"
          loud: "{{ steps.shout.output }}"
          statuses: ["{{ steps.greet.status }}", "{{ steps.shout.ran }}"]
        """,
        {"name": "ada"},
    )
    assert result.status == COMPLETED
    assert result.output == {
        "greeting": "hello ada",
        "loud": "HELLO ADA",
        "statuses": ["completed", True],
    }


async def test_an_output_that_fails_to_render_fails_the_run() -> None:
    result = await run_yaml(
        """
        id: bad_output
        steps:
          # dict() hides the output's fields from the type checker, which would
          # refuse the workflow before it ran.
          - {step_id: a, type: template, value: "{{ dict(x=1) }}"}
        output: "{{ steps.a.output.y.z }}"
        """
    )
    assert result.status == "failed"
    assert result.error is not None
    assert result.error.startswith("output:")
    assert statuses(result) == {"a": COMPLETED}


async def test_a_wide_fan_out_and_fan_in_completes_in_order() -> None:
    steps = "\n".join(
        f"  - {{step_id: s{i}, type: template, value: '{{{{ steps.root.output + {i} }}}}'}}"
        for i in range(40)
    )
    total = " + ".join(f"steps.s{i}.output" for i in range(40))
    text = (
        "id: fan\nsteps:\n  - {step_id: root, type: template, value: 1}\n"
        f"{steps}\n  - step_id: total\n    type: template\n    value: '{{{{ {total} }}}}'\n"
    )
    result = await run_yaml(text, runner=make_runner(max_parallel=4))
    assert result.status == COMPLETED
    assert result.output == {"total": sum(1 + i for i in range(40))}
    assert all(status == COMPLETED for status in statuses(result).values())


async def test_steps_and_keys_named_like_dict_methods_resolve_to_the_data() -> None:
    # `steps.items` must be the step called items, not the dict method of `steps`.
    result = await run_yaml(
        """
        id: dict_names
        steps:
          - {step_id: items, type: template, value: {values: [1, 2], keys: k, get: g}}
          - step_id: values
            type: template
            value: "{{ steps.items.output.values + [steps.items.output.keys] }}"
          - {step_id: get, type: template, value: "{{ steps.items.output.get }}"}
          - {step_id: copy, type: template, value: "{{ input.update }}"}
        """,
        {"update": "u"},
    )
    assert result.status == COMPLETED, result.error
    assert result.output == {"values": [1, 2, "k"], "get": "g", "copy": "u"}

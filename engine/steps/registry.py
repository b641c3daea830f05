"""Step types are found through the ``fusion.steps`` entry-point group (the built-ins
register the same way), so a package adds a step type by being installed."""

from __future__ import annotations

from functools import lru_cache
from importlib.metadata import entry_points

import structlog

from engine.steps.base import StepPlugin

ENTRY_POINT_GROUP = "fusion.steps"
log = structlog.get_logger(__name__)


class StepRegistry:
    def __init__(self) -> None:
        self._plugins: dict[str, StepPlugin] = {}

    def register(self, plugin: type[StepPlugin] | StepPlugin) -> None:
        instance = plugin() if isinstance(plugin, type) else plugin
        name = instance.type_name
        if name in self._plugins and type(self._plugins[name]) is not type(instance):
            raise ValueError(f"step type '{name}' is already registered")
        self._plugins[name] = instance

    def load_entry_points(self) -> StepRegistry:
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            try:
                cls = ep.load()
            except Exception as exc:  # a broken third-party plugin must not take the engine down
                log.error("step_plugin_load_failed", entry_point=ep.name, error=str(exc))
                continue
            if getattr(cls, "type_name", None) != ep.name:
                log.error("step_plugin_name_mismatch", entry_point=ep.name, type_name=cls.type_name)
                continue
            try:
                self.register(cls)
            except ValueError as exc:  # two packages claiming one step type name
                log.error("step_plugin_conflict", entry_point=ep.name, error=str(exc))
        return self

    def get(self, name: str) -> StepPlugin | None:
        return self._plugins.get(name)

    def names(self) -> list[str]:
        return sorted(self._plugins)

    def copy(self) -> StepRegistry:
        clone = StepRegistry()
        clone._plugins = dict(self._plugins)
        return clone


@lru_cache(maxsize=1)
def _installed() -> StepRegistry:
    return StepRegistry().load_entry_points()


def default_registry() -> StepRegistry:
    """The installed step types. A copy, so callers (tests) may register more freely."""
    return _installed().copy()

"""Settings: defaults, overridden by fusion.yaml, then FUSION_* environment variables,
then explicit keyword arguments (the CLI's flags)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML

_ENV_PREFIX = "FUSION_"


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8000
    data_dir: Path = Path("data")
    workflows_dir: Path = Path("workflows")
    log_format: str = "console"  # console | json
    log_level: str = "info"
    max_parallel_steps: int = 16
    max_workflow_depth: int = 8
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def db_path(self) -> Path:
        return self.data_dir / "fusion.sqlite3"

    @classmethod
    def load(cls, config_file: Path | None = None, **overrides: Any) -> Settings:
        values: dict[str, Any] = {}
        path = config_file or Path(os.environ.get(f"{_ENV_PREFIX}CONFIG", "fusion.yaml"))
        if path.is_file():
            loaded = YAML(typ="safe").load(path.read_text(encoding="utf-8")) or {}
            if not isinstance(loaded, dict):
                raise ValueError(f"{path}: expected a mapping of settings")
            values.update(loaded)
        for f in fields(cls):
            env = os.environ.get(f"{_ENV_PREFIX}{f.name.upper()}")
            if env is not None:
                values[f.name] = env
        values.update({k: v for k, v in overrides.items() if v is not None})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown setting(s): {', '.join(unknown)}")
        return cls(**{k: _coerce(cls, k, v) for k, v in values.items()})


def _coerce(cls: type[Settings], name: str, value: Any) -> Any:
    default = next(f for f in fields(cls) if f.name == name).default
    if isinstance(default, Path):
        return Path(value)
    if isinstance(default, bool):
        return value if isinstance(value, bool) else str(value).lower() in {"1", "true", "yes"}
    if isinstance(default, int):
        return int(value)
    return value

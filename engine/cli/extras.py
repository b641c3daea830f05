"""Which optional extra of the `fusion` distribution brings a module (pyproject.toml).

The core install validates, lints and runs mocked workflows; a command that reaches a
module of an extra the install lacks is told which extra to install instead of failing
with a traceback. tests/test_core_install.py checks this table against pyproject.toml.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Sequence

# Top-level import name -> the extra that installs it. A module in several extras names
# the one a user most likely lacks for it.
MODULE_EXTRAS: dict[str, str] = {
    "litestar": "server",
    "uvicorn": "server",
    "python_multipart": "server",
    "multipart": "server",
    "apsw": "server",
    "sqlite_vec": "server",
    "numpy": "server",
    "pypdfium2": "server",
    "selectolax": "server",
    "charset_normalizer": "server",
    "prometheus_client": "server",
    "limits": "server",
    "psutil": "server",
    "mlx": "models",
    "mlx_lm": "models",
    "mlx_vlm": "models",
    "PIL": "models",
    "transformers": "models",
    "huggingface_hub": "models",
    "tokenizers": "models",
    "numba": "audio",
    "tiktoken": "audio",
    "more_itertools": "audio",
    "scipy": "audio",
    "tqdm": "audio",
}
# One module of each extra, looked up (not imported) before a command starts work that
# would fail deep inside, where no ModuleNotFoundError reaches the CLI (the server's
# startup loads its models in uvicorn's lifespan).
PROBES: dict[str, str] = {"server": "litestar", "models": "mlx_lm", "audio": "numba"}


class MissingExtra(Exception):
    def __init__(self, command: str, extras: Sequence[str]) -> None:
        names = " and ".join(extras)
        noun = "extras" if len(extras) > 1 else "extra"
        spec = ",".join(extras)
        # MLX on Linux needs its backend extra too; `cpu` fits every machine.
        if "models" in extras and sys.platform == "linux":
            spec += ",cpu"
        super().__init__(f"fusion {command} needs the {names} {noun}: pip install 'fusion[{spec}]'")


def missing_extra(exc: ModuleNotFoundError) -> str | None:
    """The extra whose absence raised ``exc``; None for a module no extra provides (a bug
    or a broken install, which keeps its traceback)."""
    if not exc.name:
        return None
    return MODULE_EXTRAS.get(exc.name.split(".")[0])


def require(command: str, *extras: str) -> None:
    """Raise MissingExtra unless every extra named is installed."""
    missing = [extra for extra in extras if importlib.util.find_spec(PROBES[extra]) is None]
    if missing:
        raise MissingExtra(command, missing)

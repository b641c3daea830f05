"""Memory readings and the default budget for loaded models."""

from __future__ import annotations

import gc
import os
from typing import Any

GIB = 1024**3
# Share of memory models may use when no budget is configured. On unified-memory Macs
# Metal recommends a working-set size; on CPU-only machines the models share RAM with
# everything else, so take half.
METAL_SHARE = 0.9
CPU_SHARE = 0.5


def active_bytes() -> int:
    import mlx.core as mx

    return int(mx.get_active_memory())


def release_cached() -> None:
    import mlx.core as mx

    gc.collect()
    mx.clear_cache()


def system_memory_bytes() -> int:
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def default_budget_bytes() -> int:
    try:
        import mlx.core as mx

        info: dict[str, Any] = dict(mx.device_info())
        working_set = info.get("max_recommended_working_set_size")
        if working_set:
            return int(working_set * METAL_SHARE)
    except Exception:  # no MLX: the budget still bounds what the registry accepts
        pass
    return int(system_memory_bytes() * CPU_SHARE)


def gb(n: int | float) -> float:
    return round(n / GIB, 4)

"""Memory readings and the default budget for loaded models."""

from __future__ import annotations

import gc
import os
from typing import Any

GIB = 1024**3
# Share of memory models may use when no budget is configured. On unified-memory Macs
# Metal recommends a working-set size; a CUDA device's memory is the models' own, less
# what the runtime and activations need; on CPU-only machines the models share RAM with
# everything else, so take half.
METAL_SHARE = 0.9
CUDA_SHARE = 0.9
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
    except Exception:  # no MLX: the budget still bounds what the registry accepts
        info = {}
    return budget_from_device(info, system_memory_bytes())


def budget_from_device(info: dict[str, Any], system_bytes: int) -> int:
    """The default budget from MLX's `device_info()`: Metal names its recommended working
    set, CUDA its total memory; the CPU backend names neither."""
    working_set = info.get("max_recommended_working_set_size")
    if working_set:
        return int(working_set * METAL_SHARE)
    total = info.get("total_memory")
    if total:
        return int(total * CUDA_SHARE)
    return int(system_bytes * CPU_SHARE)


def gb(n: int | float) -> float:
    return round(n / GIB, 4)

"""Use an optimised BLAS for MLX on Linux CPUs.

The mlx[cpu] wheel links the netlib reference BLAS it bundles (3.7 GFLOP/s for a 1024²
float32 matmul on this project's 2-core machines). Loading Debian's OpenBLAS with
RTLD_GLOBAL before the first ``import mlx.core`` makes MLX resolve the same cblas
symbols to it (147 GFLOP/s there). Set FUSION_BLAS=bundled to keep the bundled one.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys
from pathlib import Path

CANDIDATES = (
    "/usr/lib/{arch}-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/{arch}-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
)

loaded: str | None = None  # the library in use, for diagnostics


def prefer_openblas() -> str | None:
    """Load OpenBLAS globally if it exists and MLX is not imported yet."""
    global loaded
    if loaded or sys.platform != "linux" or os.environ.get("FUSION_BLAS") == "bundled":
        return loaded
    if "mlx.core" in sys.modules:  # too late: MLX already bound its BLAS
        return None
    arch = platform.machine()
    for pattern in CANDIDATES:
        path = pattern.format(arch=arch)
        if Path(path).exists():
            try:
                ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            except OSError:
                continue
            loaded = path
            return path
    return None

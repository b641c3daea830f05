"""engine.models.memory's default budget, from what MLX's device_info() says on each
backend (the dictionaries are the keys each backend reports)."""

from __future__ import annotations

from engine.models.memory import CPU_SHARE, CUDA_SHARE, METAL_SHARE, budget_from_device

GIB = 1 << 30
SYSTEM = 64 * GIB


def test_metal_uses_its_recommended_working_set() -> None:
    info = {"max_recommended_working_set_size": 48 * GIB, "memory_size": 64 * GIB}
    assert budget_from_device(info, SYSTEM) == int(48 * GIB * METAL_SHARE)


def test_cuda_uses_the_device_memory_not_the_host_ram() -> None:
    info = {"device_name": "NVIDIA H100 80GB HBM3", "total_memory": 80 * GIB}
    assert budget_from_device(info, SYSTEM) == int(80 * GIB * CUDA_SHARE)


def test_the_cpu_backend_shares_the_host_ram() -> None:
    info = {"architecture": "x86_64", "device_name": "AMD EPYC"}
    assert budget_from_device(info, SYSTEM) == int(SYSTEM * CPU_SHARE)

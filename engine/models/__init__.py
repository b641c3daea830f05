"""Models: the registry, its backends and their memory accounting."""

from engine.models.blas import prefer_openblas

# Before anything below imports mlx.core (see engine/models/blas.py).
prefer_openblas()

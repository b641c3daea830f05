"""The image model types. Their backend would be built on the mflux package, which this
server does not have yet: they are declared, so the DSL and the API know them, and a load
is refused with a 400 that names the package, never faked."""

from __future__ import annotations

from pathlib import Path

from engine.errors import ErrorCode, InvalidRequest
from engine.models.backends.base import Backend, LoadedModel
from engine.models.types import Capability, ModelType


class MfluxBackend(Backend):
    package = "mflux"

    def available(self) -> bool:
        return False

    def unavailable_reason(self) -> str:
        return (
            f"this server has no '{self.model_type}' backend yet (it would be built on the "
            f"'{self.package}' package)"
        )

    def load(self, path: Path, context_length: int | None) -> LoadedModel:
        raise InvalidRequest(
            f"no backend for '{self.model_type}'", code=ErrorCode.BACKEND_UNAVAILABLE
        )


class ImageGenerationBackend(MfluxBackend):
    model_type = ModelType.IMAGE_GENERATION
    capabilities = (Capability.IMAGE_GENERATION,)


class ImageEditBackend(MfluxBackend):
    model_type = ModelType.IMAGE_EDIT
    capabilities = (Capability.IMAGE_EDIT,)

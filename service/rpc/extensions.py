"""The eight RPCs of Triton's protocol extensions: shared memory, trace and log settings.

`ExtensionServicer` is mixed into the inference servicer; its state lives in `ServerExtensions`
(one per server process). System shared memory is served; CUDA shared memory is refused with a
status that says why (models here run on the CPU); trace and log settings change at run time.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import grpc

from pb import grpc_service_pb2 as pb

from ..core.errors import InvalidInput, ServingError
from ..core.shared_memory import MAX_REGIONS, SharedMemoryRegistry
from ..observability import logs
from ..observability.tracing import DEFAULT_OTLP_URL, TraceControl

CUDA_REFUSAL = (
    "CUDA shared memory needs a GPU build serving its models on CUDA; this server runs its "
    "models on the CPU: use system shared memory (SystemSharedMemoryRegister) instead"
)


class CudaSharedMemoryUnavailable(ServingError):
    """CUDA shared memory on a server whose models run on the CPU."""

    status = "UNAVAILABLE"


@dataclass
class ServerExtensions:
    """The state behind the extension RPCs: shared-memory regions, trace settings."""

    shared_memory: SharedMemoryRegistry = field(default_factory=SharedMemoryRegistry)
    tracing: TraceControl = field(default_factory=TraceControl)

    @classmethod
    def create(
        cls, max_regions: int = MAX_REGIONS, otlp_url: str = DEFAULT_OTLP_URL
    ) -> ServerExtensions:
        """Extensions with the server's limits."""
        return cls(SharedMemoryRegistry(max_regions), TraceControl(otlp_url))

    def close(self) -> None:
        """Unmap every region and write the traces still held."""
        self.shared_memory.close()
        self.tracing.close()


class ExtensionServicer:
    """SystemSharedMemory*, CudaSharedMemory*, TraceSetting and LogSettings."""

    extensions: ServerExtensions

    async def SystemSharedMemoryStatus(
        self, request: pb.SystemSharedMemoryStatusRequest, context: grpc.aio.ServicerContext
    ) -> pb.SystemSharedMemoryStatusResponse:
        response = pb.SystemSharedMemoryStatusResponse()
        for info in self.extensions.shared_memory.status(request.name):
            response.regions[info.name].CopyFrom(
                pb.SystemSharedMemoryStatusResponse.RegionStatus(
                    name=info.name, key=info.key, offset=info.offset, byte_size=info.byte_size
                )
            )
        return response

    async def SystemSharedMemoryRegister(
        self, request: pb.SystemSharedMemoryRegisterRequest, context: grpc.aio.ServicerContext
    ) -> pb.SystemSharedMemoryRegisterResponse:
        self.extensions.shared_memory.register(
            request.name, request.key, request.offset, request.byte_size
        )
        return pb.SystemSharedMemoryRegisterResponse()

    async def SystemSharedMemoryUnregister(
        self, request: pb.SystemSharedMemoryUnregisterRequest, context: grpc.aio.ServicerContext
    ) -> pb.SystemSharedMemoryUnregisterResponse:
        self.extensions.shared_memory.unregister(request.name)
        return pb.SystemSharedMemoryUnregisterResponse()

    async def CudaSharedMemoryStatus(
        self, request: pb.CudaSharedMemoryStatusRequest, context: grpc.aio.ServicerContext
    ) -> pb.CudaSharedMemoryStatusResponse:
        raise CudaSharedMemoryUnavailable(CUDA_REFUSAL)

    async def CudaSharedMemoryRegister(
        self, request: pb.CudaSharedMemoryRegisterRequest, context: grpc.aio.ServicerContext
    ) -> pb.CudaSharedMemoryRegisterResponse:
        raise CudaSharedMemoryUnavailable(CUDA_REFUSAL)

    async def CudaSharedMemoryUnregister(
        self, request: pb.CudaSharedMemoryUnregisterRequest, context: grpc.aio.ServicerContext
    ) -> pb.CudaSharedMemoryUnregisterResponse:
        raise CudaSharedMemoryUnavailable(CUDA_REFUSAL)

    async def TraceSetting(
        self, request: pb.TraceSettingRequest, context: grpc.aio.ServicerContext
    ) -> pb.TraceSettingResponse:
        model = request.model_name
        if model:
            self._check_model(model)
        changes = {
            name: (list(value.value) if value.value else None)
            for name, value in request.settings.items()
        }
        settings = self.extensions.tracing.update(model, changes)
        response = pb.TraceSettingResponse()
        for name, values in settings.as_strings().items():
            response.settings[name].value.extend(values)
        return response

    def _check_model(self, name: str) -> None:
        """Raise NOT_FOUND for a model the repository does not know."""
        raise NotImplementedError

    async def LogSettings(
        self, request: pb.LogSettingsRequest, context: grpc.aio.ServicerContext
    ) -> pb.LogSettingsResponse:
        changes: dict[str, logs.LogValue] = {}
        for name, value in request.settings.items():
            kind = value.WhichOneof("parameter_choice")
            if kind is None:
                raise InvalidInput(f"log setting {name} has no value")
            changes[name] = getattr(value, kind)
        current = logs.update_log_settings(changes) if changes else logs.log_settings()
        response = pb.LogSettingsResponse()
        for name, setting in current.items():
            target = response.settings[name]
            if isinstance(setting, bool):
                target.bool_param = setting
            elif isinstance(setting, int):
                target.uint32_param = setting
            else:
                target.string_param = setting
        return response

from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ServingState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SERVING_STATE_UNSPECIFIED: _ClassVar[ServingState]
    SERVING_STATE_NO_ENGINE: _ClassVar[ServingState]
    SERVING_STATE_SERVING: _ClassVar[ServingState]
    SERVING_STATE_DRAINING: _ClassVar[ServingState]
    SERVING_STATE_SWAPPING: _ClassVar[ServingState]
    SERVING_STATE_STOPPING: _ClassVar[ServingState]
SERVING_STATE_UNSPECIFIED: ServingState
SERVING_STATE_NO_ENGINE: ServingState
SERVING_STATE_SERVING: ServingState
SERVING_STATE_DRAINING: ServingState
SERVING_STATE_SWAPPING: ServingState
SERVING_STATE_STOPPING: ServingState

class GetInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class EngineInfo(_message.Message):
    __slots__ = ("engine_id", "engine_version", "architecture", "quantization", "group_size", "kv_dtype", "max_batch", "max_seq_len", "target_sms", "min_runtime_version", "engine_dir", "load_seconds", "vocab_size", "num_layers", "hidden_size")
    ENGINE_ID_FIELD_NUMBER: _ClassVar[int]
    ENGINE_VERSION_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    QUANTIZATION_FIELD_NUMBER: _ClassVar[int]
    GROUP_SIZE_FIELD_NUMBER: _ClassVar[int]
    KV_DTYPE_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_FIELD_NUMBER: _ClassVar[int]
    MAX_SEQ_LEN_FIELD_NUMBER: _ClassVar[int]
    TARGET_SMS_FIELD_NUMBER: _ClassVar[int]
    MIN_RUNTIME_VERSION_FIELD_NUMBER: _ClassVar[int]
    ENGINE_DIR_FIELD_NUMBER: _ClassVar[int]
    LOAD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    engine_id: str
    engine_version: int
    architecture: str
    quantization: str
    group_size: int
    kv_dtype: str
    max_batch: int
    max_seq_len: int
    target_sms: _containers.RepeatedScalarFieldContainer[str]
    min_runtime_version: str
    engine_dir: str
    load_seconds: float
    vocab_size: int
    num_layers: int
    hidden_size: int
    def __init__(self, engine_id: _Optional[str] = ..., engine_version: _Optional[int] = ..., architecture: _Optional[str] = ..., quantization: _Optional[str] = ..., group_size: _Optional[int] = ..., kv_dtype: _Optional[str] = ..., max_batch: _Optional[int] = ..., max_seq_len: _Optional[int] = ..., target_sms: _Optional[_Iterable[str]] = ..., min_runtime_version: _Optional[str] = ..., engine_dir: _Optional[str] = ..., load_seconds: _Optional[float] = ..., vocab_size: _Optional[int] = ..., num_layers: _Optional[int] = ..., hidden_size: _Optional[int] = ...) -> None: ...

class DeviceInfo(_message.Message):
    __slots__ = ("device", "gpu_name", "sm", "gpu_memory_total_bytes", "gpu_memory_used_bytes")
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    GPU_NAME_FIELD_NUMBER: _ClassVar[int]
    SM_FIELD_NUMBER: _ClassVar[int]
    GPU_MEMORY_TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    GPU_MEMORY_USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    device: str
    gpu_name: str
    sm: str
    gpu_memory_total_bytes: int
    gpu_memory_used_bytes: int
    def __init__(self, device: _Optional[str] = ..., gpu_name: _Optional[str] = ..., sm: _Optional[str] = ..., gpu_memory_total_bytes: _Optional[int] = ..., gpu_memory_used_bytes: _Optional[int] = ...) -> None: ...

class Info(_message.Message):
    __slots__ = ("runtime_version", "uptime_seconds", "state", "engine", "device", "slots_total", "slots_busy", "queue_depth", "queue_capacity", "process_rss_bytes", "requests_total", "tokens_generated", "retiring_engines")
    RUNTIME_VERSION_FIELD_NUMBER: _ClassVar[int]
    UPTIME_SECONDS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    SLOTS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    SLOTS_BUSY_FIELD_NUMBER: _ClassVar[int]
    QUEUE_DEPTH_FIELD_NUMBER: _ClassVar[int]
    QUEUE_CAPACITY_FIELD_NUMBER: _ClassVar[int]
    PROCESS_RSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    TOKENS_GENERATED_FIELD_NUMBER: _ClassVar[int]
    RETIRING_ENGINES_FIELD_NUMBER: _ClassVar[int]
    runtime_version: str
    uptime_seconds: float
    state: ServingState
    engine: EngineInfo
    device: DeviceInfo
    slots_total: int
    slots_busy: int
    queue_depth: int
    queue_capacity: int
    process_rss_bytes: int
    requests_total: int
    tokens_generated: int
    retiring_engines: _containers.RepeatedCompositeFieldContainer[EngineInfo]
    def __init__(self, runtime_version: _Optional[str] = ..., uptime_seconds: _Optional[float] = ..., state: _Optional[_Union[ServingState, str]] = ..., engine: _Optional[_Union[EngineInfo, _Mapping]] = ..., device: _Optional[_Union[DeviceInfo, _Mapping]] = ..., slots_total: _Optional[int] = ..., slots_busy: _Optional[int] = ..., queue_depth: _Optional[int] = ..., queue_capacity: _Optional[int] = ..., process_rss_bytes: _Optional[int] = ..., requests_total: _Optional[int] = ..., tokens_generated: _Optional[int] = ..., retiring_engines: _Optional[_Iterable[_Union[EngineInfo, _Mapping]]] = ...) -> None: ...

class ListRequestsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RequestInfo(_message.Message):
    __slots__ = ("id", "state", "slot", "engine_id", "prompt_tokens", "prefilled_tokens", "completion_tokens", "max_tokens", "age_ms")
    class State(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATE_UNSPECIFIED: _ClassVar[RequestInfo.State]
        STATE_QUEUED: _ClassVar[RequestInfo.State]
        STATE_PREFILLING: _ClassVar[RequestInfo.State]
        STATE_GENERATING: _ClassVar[RequestInfo.State]
    STATE_UNSPECIFIED: RequestInfo.State
    STATE_QUEUED: RequestInfo.State
    STATE_PREFILLING: RequestInfo.State
    STATE_GENERATING: RequestInfo.State
    ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    SLOT_FIELD_NUMBER: _ClassVar[int]
    ENGINE_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PREFILLED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    AGE_MS_FIELD_NUMBER: _ClassVar[int]
    id: int
    state: RequestInfo.State
    slot: int
    engine_id: str
    prompt_tokens: int
    prefilled_tokens: int
    completion_tokens: int
    max_tokens: int
    age_ms: float
    def __init__(self, id: _Optional[int] = ..., state: _Optional[_Union[RequestInfo.State, str]] = ..., slot: _Optional[int] = ..., engine_id: _Optional[str] = ..., prompt_tokens: _Optional[int] = ..., prefilled_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., max_tokens: _Optional[int] = ..., age_ms: _Optional[float] = ...) -> None: ...

class ListRequestsResponse(_message.Message):
    __slots__ = ("requests",)
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    requests: _containers.RepeatedCompositeFieldContainer[RequestInfo]
    def __init__(self, requests: _Optional[_Iterable[_Union[RequestInfo, _Mapping]]] = ...) -> None: ...

class DrainRequest(_message.Message):
    __slots__ = ("wait",)
    WAIT_FIELD_NUMBER: _ClassVar[int]
    wait: bool
    def __init__(self, wait: _Optional[bool] = ...) -> None: ...

class DrainResponse(_message.Message):
    __slots__ = ("in_flight",)
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    in_flight: int
    def __init__(self, in_flight: _Optional[int] = ...) -> None: ...

class ResumeRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ResumeResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CancelRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: int
    def __init__(self, id: _Optional[int] = ...) -> None: ...

class CancelResponse(_message.Message):
    __slots__ = ("found",)
    FOUND_FIELD_NUMBER: _ClassVar[int]
    found: bool
    def __init__(self, found: _Optional[bool] = ...) -> None: ...

from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PushHeader(_message.Message):
    __slots__ = ("size", "sha256", "stage_only")
    SIZE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    STAGE_ONLY_FIELD_NUMBER: _ClassVar[int]
    size: int
    sha256: str
    stage_only: bool
    def __init__(self, size: _Optional[int] = ..., sha256: _Optional[str] = ..., stage_only: _Optional[bool] = ...) -> None: ...

class PushRequest(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: PushHeader
    chunk: bytes
    def __init__(self, header: _Optional[_Union[PushHeader, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...

class EngineVersion(_message.Message):
    __slots__ = ("version", "engine_id", "state", "key_id", "signed_at", "expires", "size_bytes", "installed_at")
    class State(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATE_UNSPECIFIED: _ClassVar[EngineVersion.State]
        STATE_CURRENT: _ClassVar[EngineVersion.State]
        STATE_PREVIOUS: _ClassVar[EngineVersion.State]
        STATE_INSTALLED: _ClassVar[EngineVersion.State]
    STATE_UNSPECIFIED: EngineVersion.State
    STATE_CURRENT: EngineVersion.State
    STATE_PREVIOUS: EngineVersion.State
    STATE_INSTALLED: EngineVersion.State
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ENGINE_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    SIGNED_AT_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    INSTALLED_AT_FIELD_NUMBER: _ClassVar[int]
    version: int
    engine_id: str
    state: EngineVersion.State
    key_id: str
    signed_at: str
    expires: str
    size_bytes: int
    installed_at: float
    def __init__(self, version: _Optional[int] = ..., engine_id: _Optional[str] = ..., state: _Optional[_Union[EngineVersion.State, str]] = ..., key_id: _Optional[str] = ..., signed_at: _Optional[str] = ..., expires: _Optional[str] = ..., size_bytes: _Optional[int] = ..., installed_at: _Optional[float] = ...) -> None: ...

class PushResponse(_message.Message):
    __slots__ = ("engine", "activated", "swap_mode")
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    ACTIVATED_FIELD_NUMBER: _ClassVar[int]
    SWAP_MODE_FIELD_NUMBER: _ClassVar[int]
    engine: EngineVersion
    activated: bool
    swap_mode: str
    def __init__(self, engine: _Optional[_Union[EngineVersion, _Mapping]] = ..., activated: _Optional[bool] = ..., swap_mode: _Optional[str] = ...) -> None: ...

class ListEnginesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListEnginesResponse(_message.Message):
    __slots__ = ("engines",)
    ENGINES_FIELD_NUMBER: _ClassVar[int]
    engines: _containers.RepeatedCompositeFieldContainer[EngineVersion]
    def __init__(self, engines: _Optional[_Iterable[_Union[EngineVersion, _Mapping]]] = ...) -> None: ...

class ActivateRequest(_message.Message):
    __slots__ = ("version",)
    VERSION_FIELD_NUMBER: _ClassVar[int]
    version: int
    def __init__(self, version: _Optional[int] = ...) -> None: ...

class ActivateResponse(_message.Message):
    __slots__ = ("engine", "swap_mode")
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    SWAP_MODE_FIELD_NUMBER: _ClassVar[int]
    engine: EngineVersion
    swap_mode: str
    def __init__(self, engine: _Optional[_Union[EngineVersion, _Mapping]] = ..., swap_mode: _Optional[str] = ...) -> None: ...

class RollbackRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RollbackResponse(_message.Message):
    __slots__ = ("engine", "from_version")
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    FROM_VERSION_FIELD_NUMBER: _ClassVar[int]
    engine: EngineVersion
    from_version: int
    def __init__(self, engine: _Optional[_Union[EngineVersion, _Mapping]] = ..., from_version: _Optional[int] = ...) -> None: ...

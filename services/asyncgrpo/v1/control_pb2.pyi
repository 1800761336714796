from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RunStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RUN_STATUS_UNSPECIFIED: _ClassVar[RunStatus]
    RUN_STATUS_RUNNING: _ClassVar[RunStatus]
    RUN_STATUS_PAUSED: _ClassVar[RunStatus]
    RUN_STATUS_DRAINING: _ClassVar[RunStatus]
    RUN_STATUS_STOPPING: _ClassVar[RunStatus]
    RUN_STATUS_STOPPED: _ClassVar[RunStatus]

class EventKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EVENT_KIND_UNSPECIFIED: _ClassVar[EventKind]
    EVENT_KIND_SNAPSHOT: _ClassVar[EventKind]
    EVENT_KIND_PAUSED: _ClassVar[EventKind]
    EVENT_KIND_RESUMED: _ClassVar[EventKind]
    EVENT_KIND_VERSION: _ClassVar[EventKind]
    EVENT_KIND_KNOBS: _ClassVar[EventKind]
    EVENT_KIND_MODE: _ClassVar[EventKind]
    EVENT_KIND_STATUS: _ClassVar[EventKind]
    EVENT_KIND_TRAINER: _ClassVar[EventKind]
RUN_STATUS_UNSPECIFIED: RunStatus
RUN_STATUS_RUNNING: RunStatus
RUN_STATUS_PAUSED: RunStatus
RUN_STATUS_DRAINING: RunStatus
RUN_STATUS_STOPPING: RunStatus
RUN_STATUS_STOPPED: RunStatus
EVENT_KIND_UNSPECIFIED: EventKind
EVENT_KIND_SNAPSHOT: EventKind
EVENT_KIND_PAUSED: EventKind
EVENT_KIND_RESUMED: EventKind
EVENT_KIND_VERSION: EventKind
EVENT_KIND_KNOBS: EventKind
EVENT_KIND_MODE: EventKind
EVENT_KIND_STATUS: EventKind
EVENT_KIND_TRAINER: EventKind

class ServerState(_message.Message):
    __slots__ = ("url", "healthy", "weight_version", "running_requests", "waiting_requests", "error")
    URL_FIELD_NUMBER: _ClassVar[int]
    HEALTHY_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_VERSION_FIELD_NUMBER: _ClassVar[int]
    RUNNING_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    WAITING_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    url: str
    healthy: bool
    weight_version: int
    running_requests: int
    waiting_requests: int
    error: str
    def __init__(self, url: _Optional[str] = ..., healthy: _Optional[bool] = ..., weight_version: _Optional[int] = ..., running_requests: _Optional[int] = ..., waiting_requests: _Optional[int] = ..., error: _Optional[str] = ...) -> None: ...

class RunSummary(_message.Message):
    __slots__ = ("run_id", "experiment", "trial", "status", "version", "updated_at")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    EXPERIMENT_FIELD_NUMBER: _ClassVar[int]
    TRIAL_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    experiment: str
    trial: str
    status: RunStatus
    version: int
    updated_at: float
    def __init__(self, run_id: _Optional[str] = ..., experiment: _Optional[str] = ..., trial: _Optional[str] = ..., status: _Optional[_Union[RunStatus, str]] = ..., version: _Optional[int] = ..., updated_at: _Optional[float] = ...) -> None: ...

class Run(_message.Message):
    __slots__ = ("summary", "paused", "mode", "trainer_state", "trainer_alive", "max_steps", "started_at", "knobs", "servers", "config")
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    PAUSED_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    TRAINER_STATE_FIELD_NUMBER: _ClassVar[int]
    TRAINER_ALIVE_FIELD_NUMBER: _ClassVar[int]
    MAX_STEPS_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    KNOBS_FIELD_NUMBER: _ClassVar[int]
    SERVERS_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    summary: RunSummary
    paused: bool
    mode: str
    trainer_state: str
    trainer_alive: bool
    max_steps: int
    started_at: float
    knobs: _struct_pb2.Struct
    servers: _containers.RepeatedCompositeFieldContainer[ServerState]
    config: _struct_pb2.Struct
    def __init__(self, summary: _Optional[_Union[RunSummary, _Mapping]] = ..., paused: _Optional[bool] = ..., mode: _Optional[str] = ..., trainer_state: _Optional[str] = ..., trainer_alive: _Optional[bool] = ..., max_steps: _Optional[int] = ..., started_at: _Optional[float] = ..., knobs: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., servers: _Optional[_Iterable[_Union[ServerState, _Mapping]]] = ..., config: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class AuditEntry(_message.Message):
    __slots__ = ("at", "who", "action", "key", "old", "new")
    AT_FIELD_NUMBER: _ClassVar[int]
    WHO_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    OLD_FIELD_NUMBER: _ClassVar[int]
    NEW_FIELD_NUMBER: _ClassVar[int]
    at: float
    who: str
    action: str
    key: str
    old: _struct_pb2.Value
    new: _struct_pb2.Value
    def __init__(self, at: _Optional[float] = ..., who: _Optional[str] = ..., action: _Optional[str] = ..., key: _Optional[str] = ..., old: _Optional[_Union[_struct_pb2.Value, _Mapping]] = ..., new: _Optional[_Union[_struct_pb2.Value, _Mapping]] = ...) -> None: ...

class ListRunsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListRunsResponse(_message.Message):
    __slots__ = ("runs",)
    RUNS_FIELD_NUMBER: _ClassVar[int]
    runs: _containers.RepeatedCompositeFieldContainer[RunSummary]
    def __init__(self, runs: _Optional[_Iterable[_Union[RunSummary, _Mapping]]] = ...) -> None: ...

class GetRunRequest(_message.Message):
    __slots__ = ("run_id",)
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    def __init__(self, run_id: _Optional[str] = ...) -> None: ...

class GetRunResponse(_message.Message):
    __slots__ = ("run",)
    RUN_FIELD_NUMBER: _ClassVar[int]
    run: Run
    def __init__(self, run: _Optional[_Union[Run, _Mapping]] = ...) -> None: ...

class PauseRequest(_message.Message):
    __slots__ = ("run_id",)
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    def __init__(self, run_id: _Optional[str] = ...) -> None: ...

class PauseResponse(_message.Message):
    __slots__ = ("status", "audit")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    AUDIT_FIELD_NUMBER: _ClassVar[int]
    status: RunStatus
    audit: AuditEntry
    def __init__(self, status: _Optional[_Union[RunStatus, str]] = ..., audit: _Optional[_Union[AuditEntry, _Mapping]] = ...) -> None: ...

class ResumeRequest(_message.Message):
    __slots__ = ("run_id",)
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    def __init__(self, run_id: _Optional[str] = ...) -> None: ...

class ResumeResponse(_message.Message):
    __slots__ = ("status", "audit")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    AUDIT_FIELD_NUMBER: _ClassVar[int]
    status: RunStatus
    audit: AuditEntry
    def __init__(self, status: _Optional[_Union[RunStatus, str]] = ..., audit: _Optional[_Union[AuditEntry, _Mapping]] = ...) -> None: ...

class DrainRequest(_message.Message):
    __slots__ = ("run_id",)
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    def __init__(self, run_id: _Optional[str] = ...) -> None: ...

class DrainResponse(_message.Message):
    __slots__ = ("status", "audit")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    AUDIT_FIELD_NUMBER: _ClassVar[int]
    status: RunStatus
    audit: AuditEntry
    def __init__(self, status: _Optional[_Union[RunStatus, str]] = ..., audit: _Optional[_Union[AuditEntry, _Mapping]] = ...) -> None: ...

class StopRequest(_message.Message):
    __slots__ = ("run_id",)
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    def __init__(self, run_id: _Optional[str] = ...) -> None: ...

class StopResponse(_message.Message):
    __slots__ = ("status", "audit")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    AUDIT_FIELD_NUMBER: _ClassVar[int]
    status: RunStatus
    audit: AuditEntry
    def __init__(self, status: _Optional[_Union[RunStatus, str]] = ..., audit: _Optional[_Union[AuditEntry, _Mapping]] = ...) -> None: ...

class SetKnobsRequest(_message.Message):
    __slots__ = ("run_id", "knobs")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    KNOBS_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    knobs: _struct_pb2.Struct
    def __init__(self, run_id: _Optional[str] = ..., knobs: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class SetKnobsResponse(_message.Message):
    __slots__ = ("knobs", "changes")
    KNOBS_FIELD_NUMBER: _ClassVar[int]
    CHANGES_FIELD_NUMBER: _ClassVar[int]
    knobs: _struct_pb2.Struct
    changes: _containers.RepeatedCompositeFieldContainer[AuditEntry]
    def __init__(self, knobs: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., changes: _Optional[_Iterable[_Union[AuditEntry, _Mapping]]] = ...) -> None: ...

class WatchRunRequest(_message.Message):
    __slots__ = ("run_id",)
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    def __init__(self, run_id: _Optional[str] = ...) -> None: ...

class WatchRunResponse(_message.Message):
    __slots__ = ("kind", "version", "detail", "knobs", "status", "at")
    KIND_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    KNOBS_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    kind: EventKind
    version: int
    detail: str
    knobs: _struct_pb2.Struct
    status: RunStatus
    at: float
    def __init__(self, kind: _Optional[_Union[EventKind, str]] = ..., version: _Optional[int] = ..., detail: _Optional[str] = ..., knobs: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., status: _Optional[_Union[RunStatus, str]] = ..., at: _Optional[float] = ...) -> None: ...

class RegisterServerRequest(_message.Message):
    __slots__ = ("run_id", "url", "transport")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    URL_FIELD_NUMBER: _ClassVar[int]
    TRANSPORT_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    url: str
    transport: str
    def __init__(self, run_id: _Optional[str] = ..., url: _Optional[str] = ..., transport: _Optional[str] = ...) -> None: ...

class RegisterServerResponse(_message.Message):
    __slots__ = ("server",)
    SERVER_FIELD_NUMBER: _ClassVar[int]
    server: _struct_pb2.Struct
    def __init__(self, server: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class DeregisterServerRequest(_message.Message):
    __slots__ = ("run_id", "url")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    URL_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    url: str
    def __init__(self, run_id: _Optional[str] = ..., url: _Optional[str] = ...) -> None: ...

class DeregisterServerResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListServersRequest(_message.Message):
    __slots__ = ("run_id",)
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    def __init__(self, run_id: _Optional[str] = ...) -> None: ...

class ListServersResponse(_message.Message):
    __slots__ = ("servers",)
    SERVERS_FIELD_NUMBER: _ClassVar[int]
    servers: _containers.RepeatedCompositeFieldContainer[_struct_pb2.Struct]
    def __init__(self, servers: _Optional[_Iterable[_Union[_struct_pb2.Struct, _Mapping]]] = ...) -> None: ...

from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Join(_message.Message):
    __slots__ = ("job_id", "rank", "world_size", "start_step", "ids_only", "config_fingerprint", "expected")
    class ExpectedEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    START_STEP_FIELD_NUMBER: _ClassVar[int]
    IDS_ONLY_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    rank: int
    world_size: int
    start_step: int
    ids_only: bool
    config_fingerprint: str
    expected: _containers.ScalarMap[str, str]
    def __init__(self, job_id: _Optional[str] = ..., rank: _Optional[int] = ..., world_size: _Optional[int] = ..., start_step: _Optional[int] = ..., ids_only: _Optional[bool] = ..., config_fingerprint: _Optional[str] = ..., expected: _Optional[_Mapping[str, str]] = ...) -> None: ...

class Ack(_message.Message):
    __slots__ = ("step",)
    STEP_FIELD_NUMBER: _ClassVar[int]
    step: int
    def __init__(self, step: _Optional[int] = ...) -> None: ...

class StreamRequest(_message.Message):
    __slots__ = ("join", "ack")
    JOIN_FIELD_NUMBER: _ClassVar[int]
    ACK_FIELD_NUMBER: _ClassVar[int]
    join: Join
    ack: Ack
    def __init__(self, join: _Optional[_Union[Join, _Mapping]] = ..., ack: _Optional[_Union[Ack, _Mapping]] = ...) -> None: ...

class Tensor(_message.Message):
    __slots__ = ("shape", "dtype", "data")
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    data: bytes
    def __init__(self, shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ..., data: _Optional[bytes] = ...) -> None: ...

class CoresetBatch(_message.Message):
    __slots__ = ("step", "rank", "epoch", "ids", "weights", "sources", "param_version", "input_ids", "labels", "attention_mask", "step_weight_sum")
    STEP_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    SOURCES_FIELD_NUMBER: _ClassVar[int]
    PARAM_VERSION_FIELD_NUMBER: _ClassVar[int]
    INPUT_IDS_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_MASK_FIELD_NUMBER: _ClassVar[int]
    STEP_WEIGHT_SUM_FIELD_NUMBER: _ClassVar[int]
    step: int
    rank: int
    epoch: int
    ids: _containers.RepeatedScalarFieldContainer[str]
    weights: _containers.RepeatedScalarFieldContainer[float]
    sources: _containers.RepeatedScalarFieldContainer[str]
    param_version: int
    input_ids: Tensor
    labels: Tensor
    attention_mask: Tensor
    step_weight_sum: float
    def __init__(self, step: _Optional[int] = ..., rank: _Optional[int] = ..., epoch: _Optional[int] = ..., ids: _Optional[_Iterable[str]] = ..., weights: _Optional[_Iterable[float]] = ..., sources: _Optional[_Iterable[str]] = ..., param_version: _Optional[int] = ..., input_ids: _Optional[_Union[Tensor, _Mapping]] = ..., labels: _Optional[_Union[Tensor, _Mapping]] = ..., attention_mask: _Optional[_Union[Tensor, _Mapping]] = ..., step_weight_sum: _Optional[float] = ...) -> None: ...

class TensorHeader(_message.Message):
    __slots__ = ("name", "shape", "dtype", "nbytes")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    name: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    nbytes: int
    def __init__(self, name: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ..., nbytes: _Optional[int] = ...) -> None: ...

class AdapterChunk(_message.Message):
    __slots__ = ("job_id", "trainer_step", "header", "data", "sha256")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    TRAINER_STEP_FIELD_NUMBER: _ClassVar[int]
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    trainer_step: int
    header: TensorHeader
    data: bytes
    sha256: str
    def __init__(self, job_id: _Optional[str] = ..., trainer_step: _Optional[int] = ..., header: _Optional[_Union[TensorHeader, _Mapping]] = ..., data: _Optional[bytes] = ..., sha256: _Optional[str] = ...) -> None: ...

class PushReply(_message.Message):
    __slots__ = ("param_version",)
    PARAM_VERSION_FIELD_NUMBER: _ClassVar[int]
    param_version: int
    def __init__(self, param_version: _Optional[int] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class RankStatus(_message.Message):
    __slots__ = ("rank", "connected", "next_step", "acked_step")
    RANK_FIELD_NUMBER: _ClassVar[int]
    CONNECTED_FIELD_NUMBER: _ClassVar[int]
    NEXT_STEP_FIELD_NUMBER: _ClassVar[int]
    ACKED_STEP_FIELD_NUMBER: _ClassVar[int]
    rank: int
    connected: bool
    next_step: int
    acked_step: int
    def __init__(self, rank: _Optional[int] = ..., connected: _Optional[bool] = ..., next_step: _Optional[int] = ..., acked_step: _Optional[int] = ...) -> None: ...

class StatusReply(_message.Message):
    __slots__ = ("job_id", "world_size", "config_fingerprint", "selected_steps", "param_version", "epoch", "journal_first_step", "ranks", "skipped", "source_seen", "source_selected", "truncated", "selections", "selection_seconds", "peak_rss_bytes", "peak_device_bytes", "error", "source_target_share", "source_realised_share", "source_weight")
    class SkippedEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class SourceSeenEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class SourceSelectedEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class SourceTargetShareEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class SourceRealisedShareEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class SourceWeightEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    SELECTED_STEPS_FIELD_NUMBER: _ClassVar[int]
    PARAM_VERSION_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    JOURNAL_FIRST_STEP_FIELD_NUMBER: _ClassVar[int]
    RANKS_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_FIELD_NUMBER: _ClassVar[int]
    SOURCE_SEEN_FIELD_NUMBER: _ClassVar[int]
    SOURCE_SELECTED_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    SELECTIONS_FIELD_NUMBER: _ClassVar[int]
    SELECTION_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PEAK_RSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    PEAK_DEVICE_BYTES_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    SOURCE_TARGET_SHARE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_REALISED_SHARE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    world_size: int
    config_fingerprint: str
    selected_steps: int
    param_version: int
    epoch: int
    journal_first_step: int
    ranks: _containers.RepeatedCompositeFieldContainer[RankStatus]
    skipped: _containers.ScalarMap[str, int]
    source_seen: _containers.ScalarMap[str, int]
    source_selected: _containers.ScalarMap[str, int]
    truncated: int
    selections: int
    selection_seconds: float
    peak_rss_bytes: int
    peak_device_bytes: int
    error: str
    source_target_share: _containers.ScalarMap[str, float]
    source_realised_share: _containers.ScalarMap[str, float]
    source_weight: _containers.ScalarMap[str, float]
    def __init__(self, job_id: _Optional[str] = ..., world_size: _Optional[int] = ..., config_fingerprint: _Optional[str] = ..., selected_steps: _Optional[int] = ..., param_version: _Optional[int] = ..., epoch: _Optional[int] = ..., journal_first_step: _Optional[int] = ..., ranks: _Optional[_Iterable[_Union[RankStatus, _Mapping]]] = ..., skipped: _Optional[_Mapping[str, int]] = ..., source_seen: _Optional[_Mapping[str, int]] = ..., source_selected: _Optional[_Mapping[str, int]] = ..., truncated: _Optional[int] = ..., selections: _Optional[int] = ..., selection_seconds: _Optional[float] = ..., peak_rss_bytes: _Optional[int] = ..., peak_device_bytes: _Optional[int] = ..., error: _Optional[str] = ..., source_target_share: _Optional[_Mapping[str, float]] = ..., source_realised_share: _Optional[_Mapping[str, float]] = ..., source_weight: _Optional[_Mapping[str, float]] = ...) -> None: ...

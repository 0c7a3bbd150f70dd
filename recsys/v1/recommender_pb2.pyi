from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Source(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SOURCE_UNSPECIFIED: _ClassVar[Source]
    SOURCE_KNOWN_USER: _ClassVar[Source]
    SOURCE_HISTORY: _ClassVar[Source]
    SOURCE_POPULARITY: _ClassVar[Source]
    SOURCE_KNOWN_USER_WITH_EVENTS: _ClassVar[Source]
SOURCE_UNSPECIFIED: Source
SOURCE_KNOWN_USER: Source
SOURCE_HISTORY: Source
SOURCE_POPULARITY: Source
SOURCE_KNOWN_USER_WITH_EVENTS: Source

class ItemFilter(_message.Message):
    __slots__ = ("all_of",)
    ALL_OF_FIELD_NUMBER: _ClassVar[int]
    all_of: _containers.RepeatedCompositeFieldContainer[AttributeCondition]
    def __init__(self, all_of: _Optional[_Iterable[_Union[AttributeCondition, _Mapping]]] = ...) -> None: ...

class AttributeCondition(_message.Message):
    __slots__ = ("attribute", "any_of", "none_of", "range")
    ATTRIBUTE_FIELD_NUMBER: _ClassVar[int]
    ANY_OF_FIELD_NUMBER: _ClassVar[int]
    NONE_OF_FIELD_NUMBER: _ClassVar[int]
    RANGE_FIELD_NUMBER: _ClassVar[int]
    attribute: str
    any_of: StringSet
    none_of: StringSet
    range: NumberRange
    def __init__(self, attribute: _Optional[str] = ..., any_of: _Optional[_Union[StringSet, _Mapping]] = ..., none_of: _Optional[_Union[StringSet, _Mapping]] = ..., range: _Optional[_Union[NumberRange, _Mapping]] = ...) -> None: ...

class StringSet(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, values: _Optional[_Iterable[str]] = ...) -> None: ...

class NumberRange(_message.Message):
    __slots__ = ("min", "max")
    MIN_FIELD_NUMBER: _ClassVar[int]
    MAX_FIELD_NUMBER: _ClassVar[int]
    min: float
    max: float
    def __init__(self, min: _Optional[float] = ..., max: _Optional[float] = ...) -> None: ...

class ScoredItem(_message.Message):
    __slots__ = ("item_id", "score")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    score: float
    def __init__(self, item_id: _Optional[str] = ..., score: _Optional[float] = ...) -> None: ...

class RecommendRequest(_message.Message):
    __slots__ = ("user_id", "history_item_ids", "k", "include_seen", "exclude_item_ids", "allowed_item_ids", "allow_fallback", "filter")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    HISTORY_ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_SEEN_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    ALLOW_FALLBACK_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    history_item_ids: _containers.RepeatedScalarFieldContainer[str]
    k: int
    include_seen: bool
    exclude_item_ids: _containers.RepeatedScalarFieldContainer[str]
    allowed_item_ids: _containers.RepeatedScalarFieldContainer[str]
    allow_fallback: bool
    filter: ItemFilter
    def __init__(self, user_id: _Optional[str] = ..., history_item_ids: _Optional[_Iterable[str]] = ..., k: _Optional[int] = ..., include_seen: _Optional[bool] = ..., exclude_item_ids: _Optional[_Iterable[str]] = ..., allowed_item_ids: _Optional[_Iterable[str]] = ..., allow_fallback: _Optional[bool] = ..., filter: _Optional[_Union[ItemFilter, _Mapping]] = ...) -> None: ...

class RecommendResponse(_message.Message):
    __slots__ = ("items", "model_version", "fallback", "source", "unknown_item_ids")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    FALLBACK_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    UNKNOWN_ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[ScoredItem]
    model_version: str
    fallback: bool
    source: Source
    unknown_item_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, items: _Optional[_Iterable[_Union[ScoredItem, _Mapping]]] = ..., model_version: _Optional[str] = ..., fallback: _Optional[bool] = ..., source: _Optional[_Union[Source, str]] = ..., unknown_item_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class ItemIdList(_message.Message):
    __slots__ = ("item_ids",)
    ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    item_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, item_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class BatchRecommendRequest(_message.Message):
    __slots__ = ("user_ids", "k", "include_seen", "exclude_item_ids", "allowed_item_ids", "allow_fallback", "history_item_ids", "filter")
    class HistoryItemIdsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: ItemIdList
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[ItemIdList, _Mapping]] = ...) -> None: ...
    USER_IDS_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_SEEN_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    ALLOW_FALLBACK_FIELD_NUMBER: _ClassVar[int]
    HISTORY_ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    user_ids: _containers.RepeatedScalarFieldContainer[str]
    k: int
    include_seen: bool
    exclude_item_ids: _containers.RepeatedScalarFieldContainer[str]
    allowed_item_ids: _containers.RepeatedScalarFieldContainer[str]
    allow_fallback: bool
    history_item_ids: _containers.MessageMap[str, ItemIdList]
    filter: ItemFilter
    def __init__(self, user_ids: _Optional[_Iterable[str]] = ..., k: _Optional[int] = ..., include_seen: _Optional[bool] = ..., exclude_item_ids: _Optional[_Iterable[str]] = ..., allowed_item_ids: _Optional[_Iterable[str]] = ..., allow_fallback: _Optional[bool] = ..., history_item_ids: _Optional[_Mapping[str, ItemIdList]] = ..., filter: _Optional[_Union[ItemFilter, _Mapping]] = ...) -> None: ...

class UserRecommendations(_message.Message):
    __slots__ = ("user_id", "found", "items", "fallback", "source", "unknown_item_ids")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    FOUND_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    FALLBACK_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    UNKNOWN_ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    found: bool
    items: _containers.RepeatedCompositeFieldContainer[ScoredItem]
    fallback: bool
    source: Source
    unknown_item_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, user_id: _Optional[str] = ..., found: _Optional[bool] = ..., items: _Optional[_Iterable[_Union[ScoredItem, _Mapping]]] = ..., fallback: _Optional[bool] = ..., source: _Optional[_Union[Source, str]] = ..., unknown_item_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class BatchRecommendResponse(_message.Message):
    __slots__ = ("results", "model_version", "unknown_user_ids")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    UNKNOWN_USER_IDS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[UserRecommendations]
    model_version: str
    unknown_user_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, results: _Optional[_Iterable[_Union[UserRecommendations, _Mapping]]] = ..., model_version: _Optional[str] = ..., unknown_user_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class SimilarItemsRequest(_message.Message):
    __slots__ = ("item_id", "k", "exclude_item_ids", "allowed_item_ids", "filter")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    k: int
    exclude_item_ids: _containers.RepeatedScalarFieldContainer[str]
    allowed_item_ids: _containers.RepeatedScalarFieldContainer[str]
    filter: ItemFilter
    def __init__(self, item_id: _Optional[str] = ..., k: _Optional[int] = ..., exclude_item_ids: _Optional[_Iterable[str]] = ..., allowed_item_ids: _Optional[_Iterable[str]] = ..., filter: _Optional[_Union[ItemFilter, _Mapping]] = ...) -> None: ...

class SimilarItemsResponse(_message.Message):
    __slots__ = ("items", "model_version")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[ScoredItem]
    model_version: str
    def __init__(self, items: _Optional[_Iterable[_Union[ScoredItem, _Mapping]]] = ..., model_version: _Optional[str] = ...) -> None: ...

class GetUserEmbeddingsRequest(_message.Message):
    __slots__ = ("user_ids",)
    USER_IDS_FIELD_NUMBER: _ClassVar[int]
    user_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, user_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class GetItemEmbeddingsRequest(_message.Message):
    __slots__ = ("item_ids",)
    ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    item_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, item_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class Embedding(_message.Message):
    __slots__ = ("id", "values")
    ID_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    id: str
    values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, id: _Optional[str] = ..., values: _Optional[_Iterable[float]] = ...) -> None: ...

class EmbeddingsResponse(_message.Message):
    __slots__ = ("embeddings", "unknown_ids", "dim", "model_version")
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    UNKNOWN_IDS_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    embeddings: _containers.RepeatedCompositeFieldContainer[Embedding]
    unknown_ids: _containers.RepeatedScalarFieldContainer[str]
    dim: int
    model_version: str
    def __init__(self, embeddings: _Optional[_Iterable[_Union[Embedding, _Mapping]]] = ..., unknown_ids: _Optional[_Iterable[str]] = ..., dim: _Optional[int] = ..., model_version: _Optional[str] = ...) -> None: ...

class EmbedUserRequest(_message.Message):
    __slots__ = ("history_item_ids", "user_id")
    HISTORY_ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    history_item_ids: _containers.RepeatedScalarFieldContainer[str]
    user_id: str
    def __init__(self, history_item_ids: _Optional[_Iterable[str]] = ..., user_id: _Optional[str] = ...) -> None: ...

class EmbedUserResponse(_message.Message):
    __slots__ = ("embedding", "unknown_item_ids", "dim", "model_version", "source")
    EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    UNKNOWN_ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    embedding: _containers.RepeatedScalarFieldContainer[float]
    unknown_item_ids: _containers.RepeatedScalarFieldContainer[str]
    dim: int
    model_version: str
    source: Source
    def __init__(self, embedding: _Optional[_Iterable[float]] = ..., unknown_item_ids: _Optional[_Iterable[str]] = ..., dim: _Optional[int] = ..., model_version: _Optional[str] = ..., source: _Optional[_Union[Source, str]] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("version", "created_at", "dim", "metric", "n_users", "n_items", "evaluation", "loaded_at", "items_in_logs", "trained_interactions", "trained_until", "fallback_window_days", "catalogue_size", "upserted_items", "retired_items", "catalogue_seq", "attributes")
    class EvaluationEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    METRIC_FIELD_NUMBER: _ClassVar[int]
    N_USERS_FIELD_NUMBER: _ClassVar[int]
    N_ITEMS_FIELD_NUMBER: _ClassVar[int]
    EVALUATION_FIELD_NUMBER: _ClassVar[int]
    LOADED_AT_FIELD_NUMBER: _ClassVar[int]
    ITEMS_IN_LOGS_FIELD_NUMBER: _ClassVar[int]
    TRAINED_INTERACTIONS_FIELD_NUMBER: _ClassVar[int]
    TRAINED_UNTIL_FIELD_NUMBER: _ClassVar[int]
    FALLBACK_WINDOW_DAYS_FIELD_NUMBER: _ClassVar[int]
    CATALOGUE_SIZE_FIELD_NUMBER: _ClassVar[int]
    UPSERTED_ITEMS_FIELD_NUMBER: _ClassVar[int]
    RETIRED_ITEMS_FIELD_NUMBER: _ClassVar[int]
    CATALOGUE_SEQ_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTES_FIELD_NUMBER: _ClassVar[int]
    version: str
    created_at: str
    dim: int
    metric: str
    n_users: int
    n_items: int
    evaluation: _containers.ScalarMap[str, float]
    loaded_at: str
    items_in_logs: int
    trained_interactions: int
    trained_until: str
    fallback_window_days: float
    catalogue_size: int
    upserted_items: int
    retired_items: int
    catalogue_seq: int
    attributes: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, version: _Optional[str] = ..., created_at: _Optional[str] = ..., dim: _Optional[int] = ..., metric: _Optional[str] = ..., n_users: _Optional[int] = ..., n_items: _Optional[int] = ..., evaluation: _Optional[_Mapping[str, float]] = ..., loaded_at: _Optional[str] = ..., items_in_logs: _Optional[int] = ..., trained_interactions: _Optional[int] = ..., trained_until: _Optional[str] = ..., fallback_window_days: _Optional[float] = ..., catalogue_size: _Optional[int] = ..., upserted_items: _Optional[int] = ..., retired_items: _Optional[int] = ..., catalogue_seq: _Optional[int] = ..., attributes: _Optional[_Iterable[str]] = ...) -> None: ...

class ReloadModelRequest(_message.Message):
    __slots__ = ("version",)
    VERSION_FIELD_NUMBER: _ClassVar[int]
    version: str
    def __init__(self, version: _Optional[str] = ...) -> None: ...

class ReloadModelResponse(_message.Message):
    __slots__ = ("previous_version", "version", "changed")
    PREVIOUS_VERSION_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CHANGED_FIELD_NUMBER: _ClassVar[int]
    previous_version: str
    version: str
    changed: bool
    def __init__(self, previous_version: _Optional[str] = ..., version: _Optional[str] = ..., changed: _Optional[bool] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelVersion(_message.Message):
    __slots__ = ("version", "created_at", "latest", "serving")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    LATEST_FIELD_NUMBER: _ClassVar[int]
    SERVING_FIELD_NUMBER: _ClassVar[int]
    version: str
    created_at: str
    latest: bool
    serving: bool
    def __init__(self, version: _Optional[str] = ..., created_at: _Optional[str] = ..., latest: _Optional[bool] = ..., serving: _Optional[bool] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models", "serving_version")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    SERVING_VERSION_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelVersion]
    serving_version: str
    def __init__(self, models: _Optional[_Iterable[_Union[ModelVersion, _Mapping]]] = ..., serving_version: _Optional[str] = ...) -> None: ...

class ItemRecord(_message.Message):
    __slots__ = ("item_id", "attributes", "title")
    class AttributesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: StringSet
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[StringSet, _Mapping]] = ...) -> None: ...
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTES_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    attributes: _containers.MessageMap[str, StringSet]
    title: str
    def __init__(self, item_id: _Optional[str] = ..., attributes: _Optional[_Mapping[str, StringSet]] = ..., title: _Optional[str] = ...) -> None: ...

class UpsertItemsRequest(_message.Message):
    __slots__ = ("items", "change_id")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    CHANGE_ID_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[ItemRecord]
    change_id: str
    def __init__(self, items: _Optional[_Iterable[_Union[ItemRecord, _Mapping]]] = ..., change_id: _Optional[str] = ...) -> None: ...

class UnknownValue(_message.Message):
    __slots__ = ("item_id", "attribute", "value")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTE_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    attribute: str
    value: str
    def __init__(self, item_id: _Optional[str] = ..., attribute: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...

class UpsertItemsResponse(_message.Message):
    __slots__ = ("added", "updated", "unknown_values", "catalogue_seq", "change_id", "applied", "model_version")
    ADDED_FIELD_NUMBER: _ClassVar[int]
    UPDATED_FIELD_NUMBER: _ClassVar[int]
    UNKNOWN_VALUES_FIELD_NUMBER: _ClassVar[int]
    CATALOGUE_SEQ_FIELD_NUMBER: _ClassVar[int]
    CHANGE_ID_FIELD_NUMBER: _ClassVar[int]
    APPLIED_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    added: int
    updated: int
    unknown_values: _containers.RepeatedCompositeFieldContainer[UnknownValue]
    catalogue_seq: int
    change_id: str
    applied: bool
    model_version: str
    def __init__(self, added: _Optional[int] = ..., updated: _Optional[int] = ..., unknown_values: _Optional[_Iterable[_Union[UnknownValue, _Mapping]]] = ..., catalogue_seq: _Optional[int] = ..., change_id: _Optional[str] = ..., applied: _Optional[bool] = ..., model_version: _Optional[str] = ...) -> None: ...

class RetireItemsRequest(_message.Message):
    __slots__ = ("item_ids", "change_id")
    ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    CHANGE_ID_FIELD_NUMBER: _ClassVar[int]
    item_ids: _containers.RepeatedScalarFieldContainer[str]
    change_id: str
    def __init__(self, item_ids: _Optional[_Iterable[str]] = ..., change_id: _Optional[str] = ...) -> None: ...

class RetireItemsResponse(_message.Message):
    __slots__ = ("retired", "unknown_item_ids", "catalogue_seq", "change_id", "applied", "model_version")
    RETIRED_FIELD_NUMBER: _ClassVar[int]
    UNKNOWN_ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    CATALOGUE_SEQ_FIELD_NUMBER: _ClassVar[int]
    CHANGE_ID_FIELD_NUMBER: _ClassVar[int]
    APPLIED_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    retired: int
    unknown_item_ids: _containers.RepeatedScalarFieldContainer[str]
    catalogue_seq: int
    change_id: str
    applied: bool
    model_version: str
    def __init__(self, retired: _Optional[int] = ..., unknown_item_ids: _Optional[_Iterable[str]] = ..., catalogue_seq: _Optional[int] = ..., change_id: _Optional[str] = ..., applied: _Optional[bool] = ..., model_version: _Optional[str] = ...) -> None: ...

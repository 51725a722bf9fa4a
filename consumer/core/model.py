"""The Livepeer Task object (spec §1) as pydantic v2 models.

Livepeer adds fields over time and its own documentation carries placeholders
("number", "boolean") where values go, so the model is liberal:

* every model keeps unknown fields (``extra="allow"``) and dumps them back unchanged;
* enums (phase, type, profile, encoder) accept values they do not know as plain strings;
* an optional field whose value does not fit its documented type does not fail the
  whole task (``Loose``): it reads as ``None``, so a typed attribute only ever holds a
  value of its type, and the value as received is kept for :meth:`~_Wire.wire` and
  :meth:`~_Wire.raw`.

The model is strict only where an event cannot be used at all: a task without an
``id``, without ``status.phase`` or with a non-numeric ``status.updatedAt``.

Validation is by wire name only (camelCase, or the name Livepeer uses): a key spelled
like the Python attribute (``encrypted_key``) is an unknown field, kept as received, and
never fills the typed attribute, so redaction by wire name cannot be sidestepped.

Round-trip: ``Task.model_validate(d).wire()`` equals ``d`` for any JSON object ``d``
that validates (only set fields are dumped, by their wire names, misshapen values as
they came).

This module is pure: no I/O.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SerializationInfo,
    SerializerFunctionWrapHandler,
    ValidationError,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    WrapValidator,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic.alias_generators import to_camel

__all__ = [
    "Asset",
    "ClipParams",
    "Phase",
    "Task",
    "TaskOutput",
    "TaskParams",
    "TaskStatus",
    "TaskType",
    "TranscodeProfile",
    "is_number",
]


class Phase(StrEnum):
    """``status.phase``. Unknown phases are kept as plain strings."""

    PENDING = "pending"
    WAITING = "waiting"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


class TaskType(StrEnum):
    """``type``. ``import`` and ``transcode`` are legacy; unknown types are kept."""

    UPLOAD = "upload"
    EXPORT = "export"
    EXPORT_DATA = "export-data"
    TRANSCODE_FILE = "transcode-file"
    CLIP = "clip"
    IMPORT = "import"
    TRANSCODE = "transcode"


class _Misshapen:
    """A value that did not fit its field, on its way from the field's validator to the
    model's, which sets the field to None and keeps the value aside."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value


def _set_aside_on_error(
    value: Any, handler: ValidatorFunctionWrapHandler, _: ValidationInfo
) -> Any:
    # Best effort: a misshapen optional value must not cost us the whole event.
    try:
        return handler(value)
    except ValidationError:
        return _Misshapen(value)


Loose = WrapValidator(_set_aside_on_error)
"""Validate as documented when possible; otherwise the field reads None and the value as
received is kept for the round-trip."""

T = TypeVar("T")
Opt = Annotated[T | None, Loose]
Number = int | float


_INT64 = 2**63


def is_number(value: object) -> bool:
    """A JSON number usable as a time: not a boolean (an int to Python), and within a
    signed 64-bit range (orjson reads unsigned 64-bit ints; stores take signed ones)."""
    # A tuple, not int | float: isinstance takes half the time (called per event).
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return -_INT64 <= value < _INT64


class _Wire(BaseModel):
    """Base: camelCase on the wire (and only there), unknown fields kept, assignment
    unchecked, misshapen optional values read as None but kept for the wire."""

    model_config = ConfigDict(
        extra="allow",
        alias_generator=to_camel,
        # By wire name only: see the module docstring.
        populate_by_name=False,
        frozen=False,
        ser_json_inf_nan="constants",
    )

    # Field name -> the value received for it that did not fit its type.
    _misshapen: dict[str, Any] | None = PrivateAttr(default=None)

    @model_validator(mode="wrap")
    @classmethod
    def _settle(cls, data: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        model = handler(data)
        if isinstance(model, _Wire):
            model._set_aside_misshapen()
            if model.__pydantic_extra__ and isinstance(data, dict):
                model._unset_fields_named_like_extras(data)
        return model

    def _set_aside_misshapen(self) -> None:
        misshapen = None
        for name, value in self.__dict__.items():
            if type(value) is _Misshapen:
                if misshapen is None:
                    misshapen = {}
                misshapen[name] = value.value
        if misshapen is not None:
            for name in misshapen:
                self.__dict__[name] = None
            self._misshapen = misshapen

    def _unset_fields_named_like_extras(self, data: dict[str, Any]) -> None:
        # An unknown key spelled like an attribute (encrypted_key) is kept as an extra, but
        # pydantic also counts the attribute as set, and wire() would add encryptedKey:
        # null. The attribute was set only if its wire name came too.
        fields = type(self).model_fields
        for key in self.__pydantic_extra__ or {}:
            field = fields.get(key)
            if field is not None and field.alias != key and field.alias not in data:
                self.__pydantic_fields_set__.discard(key)

    @model_serializer(mode="wrap")
    def _put_back_misshapen(
        self, handler: SerializerFunctionWrapHandler, info: SerializationInfo
    ) -> Any:
        data = handler(self)
        if self._misshapen and isinstance(data, dict):
            fields = type(self).model_fields
            for name, value in self._misshapen.items():
                key = (fields[name].alias or name) if info.by_alias else name
                if key in data:  # not excluded by the caller
                    data[key] = value
        return data

    def wire(self) -> dict[str, Any]:
        """The JSON object as Livepeer would send it: only fields that were set, each as
        received (a misshapen value too)."""
        dumped: dict[str, Any] = self.model_dump(mode="json", by_alias=True, exclude_unset=True)
        return dumped

    def raw(self, key: str) -> Any:
        """The JSON value received for ``key`` (a wire name such as ``"upload"`` or
        ``"playbackId"``, or an attribute name), whatever its shape: where the typed
        attribute reads None because the value did not fit, this is the value; an
        unknown field is found here too. None when the field was absent.

        ``change.task.output.raw("upload")`` is the upload output even when Livepeer
        sent something other than an object there."""
        fields = type(self).model_fields
        alias = fields[key].alias or key if key in fields else key
        return self.wire().get(alias)


# ---------------------------------------------------------------- shared shapes


class TranscodeProfile(_Wire):
    name: Opt[str] = None
    width: Opt[Number] = None
    height: Opt[Number] = None
    bitrate: Opt[Number] = None
    fps: Opt[Number] = None
    fps_den: Opt[Number] = None
    gop: Opt[str] = None
    quality: Opt[Number] = None
    profile: Opt[str] = None  # H264Baseline | H264Main | H264High | H264ConstrainedHigh | ...
    encoder: Opt[str] = None  # H.264 | HEVC | VP8 | VP9 | ...


class Encryption(_Wire):
    encrypted_key: Opt[str] = None  # a credential: hidden by consumer.core.secrets


class PathRef(_Wire):
    path: Opt[str] = None


class UrlRef(_Wire):
    url: Opt[str] = None


class Hash(_Wire):
    hash: Opt[str] = None
    algorithm: Opt[str] = None


class Track(_Wire):
    type: Opt[str] = None
    codec: Opt[str] = None
    start_time: Opt[Number] = None
    duration: Opt[Number] = None
    bitrate: Opt[Number] = None
    width: Opt[Number] = None
    height: Opt[Number] = None
    pixel_format: Opt[str] = None
    fps: Opt[Number] = None
    channels: Opt[Number] = None
    sample_rate: Opt[Number] = None
    bit_depth: Opt[Number] = None


class VideoSpec(_Wire):
    format: Opt[str] = None
    duration: Opt[Number] = None
    bitrate: Opt[Number] = None
    tracks: Opt[list[Track]] = None


class AssetStatus(_Wire):
    phase: Opt[str] = None
    updated_at: Opt[Number] = None
    progress: Opt[Number] = None
    error_message: Opt[str] = None


class Asset(_Wire):
    """``assetSpec`` inside upload and clip outputs."""

    id: Opt[str] = None
    type: Opt[str] = None
    playback_id: Opt[str] = None
    playback_url: Opt[str] = None
    download_url: Opt[str] = None
    playback_policy: Opt[dict[str, Any]] = None
    source: Opt[dict[str, Any]] = None
    creator_id: Opt[Any] = None
    storage: Opt[dict[str, Any]] = None
    status: Opt[AssetStatus] = None
    name: Opt[str] = None
    created_at: Opt[Number] = None
    size: Opt[Number] = None
    hash: Opt[list[Hash]] = None
    video_spec: Opt[VideoSpec] = None
    static_mp4: Opt[bool] = None
    c2pa: Opt[bool] = Field(default=None, alias="c2pa")  # to_camel would say c2Pa


# ---------------------------------------------------------------- params


class UploadParams(_Wire):
    url: Opt[str] = None
    encryption: Opt[Encryption] = None
    c2pa: Opt[bool] = Field(default=None, alias="c2pa")  # to_camel would say c2Pa
    profiles: Opt[list[TranscodeProfile]] = None
    target_segment_size_secs: Opt[Number] = None
    thumbnails: Opt[bool] = None


class CustomExport(_Wire):
    url: Opt[str] = None
    method: Opt[str] = None
    headers: Opt[dict[str, Any]] = None  # may carry Authorization: hidden by consumer.core.secrets


class Pinata(_Wire):
    jwt: Opt[str] = None
    api_key: Opt[str] = None
    api_secret: Opt[str] = None


class IpfsExport(_Wire):
    nft_metadata_template: Opt[str] = None
    nft_metadata: Opt[Any] = None
    pinata: Opt[Pinata] = None


class ExportParams(_Wire):
    custom: Opt[CustomExport] = None
    ipfs: Opt[IpfsExport] = None


class ExportDataParams(_Wire):
    content: Opt[Any] = None
    ipfs: Opt[IpfsExport] = None
    type: Opt[str] = None
    id: Opt[str] = None


class TranscodeOutputs(_Wire):
    hls: Opt[PathRef] = None
    mp4: Opt[PathRef] = None
    fmp4: Opt[PathRef] = None


class TranscodeFileParams(_Wire):
    input: Opt[UrlRef] = None
    storage: Opt[UrlRef] = None  # s3+https://KEY:SECRET@host/bucket: userinfo hidden
    outputs: Opt[TranscodeOutputs] = None
    profiles: Opt[list[TranscodeProfile]] = None
    target_segment_size_secs: Opt[Number] = None
    creator_id: Opt[str] = None
    c2pa: Opt[bool] = Field(default=None, alias="c2pa")  # to_camel would say c2Pa


class ClipStrategy(_Wire):
    start_time: Opt[Number] = None
    end_time: Opt[Number] = None
    playback_id: Opt[str] = None


class ClipParams(_Wire):
    url: Opt[str] = None
    clip_strategy: Opt[ClipStrategy] = None
    catalyst_pipeline_strategy: Opt[str] = None
    session_id: Opt[str] = None
    input_id: Opt[str] = None


class LegacyTranscodeParams(_Wire):
    profile: Opt[TranscodeProfile] = None


class TaskParams(_Wire):
    """``params``: keyed by task kind; keys do not always equal the type string."""

    upload: Opt[UploadParams] = None
    import_: Opt[UploadParams] = Field(default=None, alias="import")
    export: Opt[ExportParams] = None
    export_data: Opt[ExportDataParams] = None
    transcode: Opt[LegacyTranscodeParams] = None
    transcode_file: Opt[TranscodeFileParams] = Field(default=None, alias="transcode-file")
    clip: Opt[ClipParams] = None


# ---------------------------------------------------------------- output


class AssetOutput(_Wire):
    video_file_path: Opt[str] = None
    metadata_file_path: Opt[str] = None
    asset_spec: Opt[Asset] = None


class IpfsExportOutput(_Wire):
    video_file_cid: Opt[str] = None
    video_file_url: Opt[str] = None
    video_file_gateway_url: Opt[str] = None
    nft_metadata_cid: Opt[str] = None
    nft_metadata_url: Opt[str] = None
    nft_metadata_gateway_url: Opt[str] = None


class ExportOutput(_Wire):
    ipfs: Opt[IpfsExportOutput] = None


class CidRef(_Wire):
    cid: Opt[str] = None


class ExportDataOutput(_Wire):
    ipfs: Opt[CidRef] = None


class InputVideo(_Wire):
    duration: Opt[Number] = None
    size: Opt[Number] = None


class TranscodeFileOutput(_Wire):
    # request_id / input_video are snake_case on the wire (Livepeer's own quirk).
    base_url: Opt[str] = None
    hls: Opt[PathRef] = None
    mp4: Opt[list[PathRef]] = None
    request_id: Opt[str] = Field(default=None, alias="request_id")
    input_video: Opt[InputVideo] = Field(default=None, alias="input_video")


class TaskOutput(_Wire):
    """``output``: keyed by task kind (``transcodeFile`` for transcode-file)."""

    upload: Opt[AssetOutput] = None
    import_: Opt[AssetOutput] = Field(default=None, alias="import")
    export: Opt[ExportOutput] = None
    export_data: Opt[ExportDataOutput] = None
    transcode_file: Opt[TranscodeFileOutput] = None
    clip: Opt[AssetOutput] = None


# ---------------------------------------------------------------- the task


class TaskStatus(_Wire):
    """``status``: replaced wholesale on every update (spec §4)."""

    phase: Phase | str
    updated_at: int | float
    progress: Opt[Number] = None
    error_message: Opt[str] = None
    retries: Opt[Number] = None
    step: Opt[str] = None

    @field_validator("phase", mode="before")
    @classmethod
    def _phase_is_text(cls, value: Any) -> Any:
        if not isinstance(value, str) or not value:
            raise ValueError("status.phase must be a non-empty string")
        return value

    @field_validator("updated_at", mode="before")
    @classmethod
    def _updated_at_is_number(cls, value: Any) -> Any:
        if not is_number(value):
            raise ValueError("status.updatedAt must be a number (Unix milliseconds)")
        return value


class Task(_Wire):
    """A Livepeer Task snapshot, or the task phasewatch materialized from several."""

    id: str
    type: Opt[TaskType | str] = None
    created_at: Opt[Number] = None
    scheduled_at: Opt[Number] = None
    input_asset_id: Opt[str] = None
    output_asset_id: Opt[str] = None
    project_id: Opt[str] = None
    requester_id: Opt[str] = None
    user_id: Opt[str] = None
    deleted: Opt[bool] = None
    params: Opt[TaskParams] = None
    status: TaskStatus
    output: Opt[TaskOutput] = None
    # The documentation page shows ``clip`` at the top level; real traffic has it in params.
    clip: Opt[ClipParams] = None

    @field_validator("id", mode="before")
    @classmethod
    def _id_is_text(cls, value: Any) -> Any:
        if not isinstance(value, str) or not value:
            raise ValueError("task id must be a non-empty string")
        return value

    @property
    def phase(self) -> str:
        return str(self.status.phase)

    @property
    def clip_params(self) -> ClipParams | None:
        """Clip parameters wherever the producer put them (params.clip or top level)."""
        params = self.params
        if isinstance(params, TaskParams) and isinstance(params.clip, ClipParams):
            return params.clip
        return self.clip if isinstance(self.clip, ClipParams) else None

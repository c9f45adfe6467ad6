"""Request and response bodies (msgspec Structs: they are the OpenAPI schema too)."""

from __future__ import annotations

import math
from typing import Literal

import msgspec

Analysis = Literal["position_embedding", "heads", "gradients", "qk_geometry"]
# The default when a request names none; qk_geometry runs only when asked for (one more
# forward over the images, see README).
ALL_ANALYSES: tuple[Analysis, ...] = ("position_embedding", "heads", "gradients")
ProbeSet = Literal["natural-v1", "texture-v1"]
# fp32 (TF32 matmuls allowed on CUDA) or bf16 autocast of the model's passes; statistics
# are accumulated in float32 or float64 either way (workers/analysis/precision.py).
Precision = Literal["fp32", "bf16"]
AuditStatusName = Literal["queued", "running", "finished", "failed"]


class ModelArgs(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """Overrides of the timm architecture's constructor (for custom or small ViTs)."""

    img_size: int | list[int] | None = None
    patch_size: int | None = None
    embed_dim: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    mlp_ratio: float | None = None
    num_classes: int | None = None
    class_token: bool | None = None
    reg_tokens: int | None = None
    no_embed_class: bool | None = None
    qk_norm: bool | None = None
    global_pool: Literal["token", "avg", "max", "avgmax", "map", ""] | None = None
    pos_embed: Literal["learn", "none"] | None = None
    in_chans: int | None = None
    qkv_bias: bool | None = None
    final_norm: bool | None = None

    def __post_init__(self) -> None:
        for name in ("patch_size", "embed_dim", "depth", "num_heads"):
            value = getattr(self, name)
            if value is not None and not 1 <= value <= 100_000:
                raise msgspec.ValidationError(f"model_args.{name} must be between 1 and 100000")
        if self.num_classes is not None and not 0 <= self.num_classes <= 100_000:
            raise msgspec.ValidationError(
                "model_args.num_classes must be between 0 (a backbone without head) and 100000"
            )
        if self.in_chans not in (None, 1, 3):
            raise msgspec.ValidationError(
                "model_args.in_chans must be 1 (grayscale) or 3 (RGB): the probe images come in these"
            )
        if self.mlp_ratio is not None and not 0.25 <= self.mlp_ratio <= 16:
            raise msgspec.ValidationError("model_args.mlp_ratio must be between 0.25 and 16")
        sizes = [self.img_size] if isinstance(self.img_size, int) else (self.img_size or [])
        if isinstance(self.img_size, list) and len(self.img_size) != 2:
            raise msgspec.ValidationError(
                "model_args.img_size must be an integer or [height, width]"
            )
        if any(not 8 <= s <= 4096 for s in sizes):
            raise msgspec.ValidationError("model_args.img_size must be between 8 and 4096 pixels")
        if self.reg_tokens is not None and not 0 <= self.reg_tokens <= 64:
            raise msgspec.ValidationError("model_args.reg_tokens must be between 0 and 64")


class Normalization(msgspec.Struct, forbid_unknown_fields=True):
    """Per-channel ``(x - mean) / std`` for the model's inputs (images in [0, 1]); one entry per
    input channel. Default: the architecture's timm pretrained config."""

    mean: list[float]
    std: list[float]

    def __post_init__(self) -> None:
        if len(self.mean) not in (1, 3) or len(self.std) != len(self.mean):
            raise msgspec.ValidationError(
                "options.normalization needs 1 or 3 means and as many stds (one per input channel)"
            )
        if not all(math.isfinite(v) and abs(v) <= 100 for v in self.mean):
            raise msgspec.ValidationError(
                "options.normalization.mean values must be finite, within +-100"
            )
        if not all(math.isfinite(v) and 0 < v <= 100 for v in self.std):
            raise msgspec.ValidationError("options.normalization.std values must be in (0, 100]")


class AuditOptions(msgspec.Struct, forbid_unknown_fields=True):
    """What to compute and on which images. Every field is optional."""

    analyses: list[Analysis] = msgspec.field(default_factory=lambda: list(ALL_ANALYSES))
    probe_set: ProbeSet = "natural-v1"
    num_images: int = 16
    batch_size: int = 8
    seed: int = 0
    model_args: ModelArgs | None = None
    normalization: Normalization | None = None
    precision: Precision = "fp32"

    def __post_init__(self) -> None:
        if not self.analyses:
            raise msgspec.ValidationError("options.analyses must name at least one analysis")
        if len(set(self.analyses)) != len(self.analyses):
            raise msgspec.ValidationError("options.analyses lists an analysis twice")
        if not 1 <= self.num_images <= 4096:
            raise msgspec.ValidationError("options.num_images must be between 1 and 4096")
        if not 1 <= self.batch_size <= 256:
            raise msgspec.ValidationError("options.batch_size must be between 1 and 256")
        if not 0 <= self.seed < 2**32:
            raise msgspec.ValidationError("options.seed must be between 0 and 2**32 - 1")


class AuditLinks(msgspec.Struct):
    self: str
    report: str
    artifacts: str


class AuditCreated(msgspec.Struct):
    id: str
    status: AuditStatusName
    checkpoint_sha256: str
    links: AuditLinks
    # True when an identical earlier request answered (HTTP 200, no new job); false: 202, queued.
    cached: bool = False


class JobError(msgspec.Struct):
    code: str
    detail: str


class AuditState(msgspec.Struct):
    id: str
    status: AuditStatusName
    progress: float
    stage: str | None
    arch: str
    checkpoint_sha256: str
    created_at: str
    started_at: str | None
    ended_at: str | None
    timings: dict[str, float]
    error: JobError | None
    links: AuditLinks


class ArtifactList(msgspec.Struct):
    id: str
    artifacts: list[str]


class Health(msgspec.Struct):
    status: Literal["ok", "unavailable"]
    checks: dict[str, bool] = msgspec.field(default_factory=dict)


class Readiness(msgspec.Struct):
    """GET /readyz. ``unavailable`` (503): Redis does not answer, the store is not writable, or
    it has less than VITAUDIT_MIN_FREE_BYTES free. ``degraded`` (200): the API takes audits
    but no live worker listens on the queue, so they wait. ``ok`` (200): neither."""

    status: Literal["ok", "degraded", "unavailable"]
    checks: dict[str, bool]
    store_free_bytes: int | None  # None where unknown (an S3 store)
    live_workers: int | None  # None when Redis does not answer


def options_description() -> str:
    """The multipart ``options`` field's description in the OpenAPI document, from the
    Structs above (so a new option is listed where it is defined)."""
    return (
        f"JSON AuditOptions: {', '.join(AuditOptions.__struct_fields__)}; "
        f"model_args: {', '.join(ModelArgs.__struct_fields__)}; "
        f"normalization: {{{', '.join(Normalization.__struct_fields__)}}} (one per input channel)"
    )

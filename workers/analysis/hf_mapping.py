"""Hugging Face transformers ViT checkpoints -> the equivalent timm VisionTransformer.

Pure mapping over plain data: ``config.json`` as a dict and the state dict's names. Nothing
here imports ``transformers``, and nothing imports torch at module level, so the service can
name the timm model of an uploaded folder at submit time (`timm_spec`) without torch; the
worker renames and fuses the tensors (`timm_state_dict`).

Supported ``model_type``s and what becomes of them (the HF modules cited are those of
transformers' ``modeling_vit`` / ``modeling_deit`` / ``modeling_dinov2`` /
``modeling_dinov2_with_registers`` / ``modeling_clip``):

- ``vit`` (ViTModel, ViTForImageClassification): a timm ViT with a class token; the
  classifier on the class token becomes ``head``. ViTModel's pooler (dense + tanh on the class
  token) has no timm counterpart and is left out (the report's notes say so).
- ``deit`` (DeiTModel, DeiTForImageClassification, DeiTForImageClassificationWithTeacher):
  HF's DeiT always carries the distillation token, so the model is timm's
  ``VisionTransformerDistilled``. With the teacher head, ``head``/``head_dist`` are the two
  classifiers and the logits are their mean, as in HF. DeiTForImageClassification reads the
  class token only; it maps to ``head`` = 2 x classifier and ``head_dist`` = 0, whose mean is
  the same logits. (DeiT checkpoints without a distillation token are ``vit`` in HF.)
- ``dinov2`` and ``dinov2_with_registers`` (the backbones): layer scale becomes ``ls1``/``ls2``.
  With registers the position table covers the class token and the patches but not the
  registers, so, as timm's own ``*_reg4_dinov2`` models do, the class token's row is folded
  into the class token and the table keeps the patch rows (``no_embed_class=True``).
- ``clip_vision_model`` (CLIPVisionModel, CLIPVisionModelWithProjection) and ``clip``
  (CLIPModel, vision tower only): ``pre_layrnorm`` is timm's ``norm_pre``, ``post_layernorm``
  its final ``norm``; ``visual_projection`` becomes a bias-free ``head`` (timm maps CLIP's
  projection the same way), so the "logits" are the image embedding. The text tower is left
  out.

The position table is kept as stored, and the model is built at the config's ``image_size``,
whose grid is the table's (DINOv2: 37x37 at 518). An audit at another size (``model_args``),
or a table stored for another grid than the config's, is resampled with timm's own mechanism
when the model is built, and the notes say so (`workers.analysis.loading.build_model`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

SUPPORTED_MODEL_TYPES = (
    "vit",
    "deit",
    "dinov2",
    "dinov2_with_registers",
    "clip_vision_model",
    "clip",
)

# transformers' config defaults for the fields read here (a config.json written by an older
# transformers may leave defaults out); tests/test_hf_mapping.py checks them against transformers.
_VIT_DEFAULTS: dict[str, Any] = {
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-12,
    "image_size": 224,
    "patch_size": 16,
    "num_channels": 3,
    "qkv_bias": True,
}
CONFIG_DEFAULTS: dict[str, dict[str, Any]] = {
    "vit": _VIT_DEFAULTS,
    "deit": _VIT_DEFAULTS,
    "dinov2": {
        **_VIT_DEFAULTS,
        "layer_norm_eps": 1e-6,
        "patch_size": 14,
        "mlp_ratio": 4,
        "use_swiglu_ffn": False,
    },
    "dinov2_with_registers": {
        **_VIT_DEFAULTS,
        "layer_norm_eps": 1e-6,
        "patch_size": 16,
        "mlp_ratio": 4,
        "use_swiglu_ffn": False,
        "num_register_tokens": 4,
    },
    "clip_vision_model": {
        **_VIT_DEFAULTS,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
        "patch_size": 32,
    },
}

# HF activation name -> timm act_layer name (same function, not an approximation of it)
ACTIVATIONS = {
    "gelu": "gelu",
    "quick_gelu": "quick_gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "relu": "relu",
    "silu": "silu",
    "swish": "silu",
}

# Normalisation the HF image processors of each family use by default, when the folder has no
# preprocessor_config.json (ViTImageProcessor: 0.5; DeiT, DINOv2: ImageNet; CLIP: OpenAI CLIP).
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
DEFAULT_NORMALIZATION = {
    "vit": (HALF, HALF),
    "deit": (IMAGENET_MEAN, IMAGENET_STD),
    "dinov2": (IMAGENET_MEAN, IMAGENET_STD),
    "dinov2_with_registers": (IMAGENET_MEAN, IMAGENET_STD),
    "clip_vision_model": (CLIP_MEAN, CLIP_STD),
}

# timm's size names by (embed_dim, depth, num_heads): a mapped model is named after timm's own
# model of that shape when timm has one (KNOWN_ARCHS), else after its family's base model with
# every dimension in model_args. tests/test_hf_mapping.py checks that timm has each name.
SIZES = {
    (192, 12, 3): "tiny",
    (384, 12, 6): "small",
    (768, 12, 12): "base",
    (1024, 24, 16): "large",
    (1280, 32, 16): "huge",
    (1536, 40, 24): "giant",
}
KNOWN_ARCHS = frozenset(
    [f"vit_{s}_patch16_224" for s in ("tiny", "small", "base", "large")]
    + [f"vit_{s}_patch16_384" for s in ("tiny", "small", "base", "large")]
    + [f"vit_{s}_patch32_224" for s in ("small", "base", "large")]
    + [f"vit_{s}_patch32_384" for s in ("small", "base", "large")]
    + ["vit_huge_patch14_224", "vit_large_patch14_224"]
    + [f"deit_{s}_distilled_patch16_224" for s in ("tiny", "small", "base")]
    + ["deit_base_distilled_patch16_384"]
    + [f"vit_{s}_patch14_dinov2" for s in ("small", "base", "large", "giant")]
    + [f"vit_{s}_patch14_reg4_dinov2" for s in ("small", "base", "large", "giant")]
    + ["vit_base_patch16_clip_224", "vit_base_patch32_clip_224", "vit_large_patch14_clip_224"]
    + ["vit_large_patch14_clip_336", "vit_huge_patch14_clip_224"]
    + ["vit_base_patch16_clip_quickgelu_224", "vit_base_patch32_clip_quickgelu_224"]
    + ["vit_large_patch14_clip_quickgelu_224", "vit_large_patch14_clip_quickgelu_336"]
)
BASE_ARCHS = {
    "vit": "vit_base_patch16_224",
    "deit": "deit_base_distilled_patch16_224",
    "dinov2": "vit_base_patch14_dinov2",
    "dinov2_with_registers": "vit_base_patch14_reg4_dinov2",
    "clip_vision_model": "vit_base_patch16_clip_224",
}

# Legacy transformers key names (what save_pretrained writes, and what the hub holds) ->
# timm's, after the model's prefix (``vit.``, ``deit.``, ``vision_model.``) is stripped.
# q/k/v are fused afterwards (QKV_PATTERN); DROPPED keys have no timm counterpart.
RENAMES: tuple[tuple[str, str], ...] = (
    (r"^embeddings\.cls_token$", "cls_token"),
    (r"^embeddings\.distillation_token$", "dist_token"),
    (r"^embeddings\.register_tokens$", "reg_token"),
    (r"^embeddings\.position_embeddings$", "pos_embed"),
    (r"^embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (r"^embeddings\.class_embedding$", "cls_token"),
    (r"^embeddings\.patch_embedding\.", "patch_embed.proj."),
    (r"^embeddings\.position_embedding\.weight$", "pos_embed"),
    (r"^pre_layrnorm\.", "norm_pre."),
    (r"^(?:layernorm|post_layernorm)\.", "norm."),
    (r"^encoder\.layers?\.(\d+)\.(?:layernorm_before|norm1|layer_norm1)\.", r"blocks.\1.norm1."),
    (r"^encoder\.layers?\.(\d+)\.(?:layernorm_after|norm2|layer_norm2)\.", r"blocks.\1.norm2."),
    (r"^encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"blocks.\1.attn.proj."),
    (r"^encoder\.layers\.(\d+)\.self_attn\.out_proj\.", r"blocks.\1.attn.proj."),
    (r"^encoder\.layer\.(\d+)\.intermediate\.dense\.", r"blocks.\1.mlp.fc1."),
    (r"^encoder\.layer\.(\d+)\.output\.dense\.", r"blocks.\1.mlp.fc2."),
    (r"^encoder\.layers?\.(\d+)\.mlp\.(fc1|fc2)\.", r"blocks.\1.mlp.\2."),
    (r"^encoder\.layer\.(\d+)\.layer_scale([12])\.lambda1$", r"blocks.\1.ls\2.gamma"),
    (r"^encoder\.layer\.(\d+)\.mlp\.weights_in\.", r"blocks.\1.mlp.fc1."),  # SwiGLU: [gate; value]
    (r"^encoder\.layer\.(\d+)\.mlp\.weights_out\.", r"blocks.\1.mlp.fc2."),
)
QKV_PATTERN = re.compile(
    r"^encoder\.layers?\.(\d+)\.(?:attention\.attention\.(query|key|value)|self_attn\.([qkv])_proj)\.(weight|bias)$"
)
DROPPED = re.compile(
    r"^(embeddings\.mask_token|embeddings\.position_ids|pooler\..*|text_model\..*|text_projection\..*|logit_scale)$"
)
PREFIXES = ("vit.", "deit.", "dinov2.", "vision_model.")
HEAD_KEYS = (
    "classifier",
    "cls_classifier",
    "distillation_classifier",
    "visual_projection",
)


class TransformersConfigError(ValueError):
    """The config or the state dict of a transformers checkpoint cannot be mapped to timm;
    the message says what is wrong and what is supported."""


@dataclass(frozen=True)
class TimmSpec:
    """The timm model equivalent to a transformers config, as plain data.

    ``model_args`` are timm ``VisionTransformer`` keyword arguments (JSON-able); the layer-norm
    epsilon is kept apart (``layer_norm_eps``) because timm takes it as a ``norm_layer``
    callable, which the loader builds.
    """

    model_type: str
    arch: str
    model_args: dict[str, Any]
    layer_norm_eps: float
    mean: tuple[float, ...]
    std: tuple[float, ...]
    normalization_source: str
    mlp_layer: str = "mlp"  # or "swiglu": timm's SwiGLUPacked (DINOv2 giant), built by the loader
    architectures: list[str] = field(default_factory=list)

    @property
    def facts(self) -> dict[str, Any]:
        """What the report's ``model`` section says about the transformers source."""
        return {
            "model_type": self.model_type,
            "transformers_architectures": list(self.architectures),
            "layer_norm_eps": self.layer_norm_eps,
            "mlp_layer": self.mlp_layer,
            "normalization": {
                "mean": list(self.mean),
                "std": list(self.std),
                "source": self.normalization_source,
            },
        }


def _pair(value: Any, name: str) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return value, value
    if (
        isinstance(value, (list, tuple))
        and len(value) == 2
        and all(isinstance(v, int) for v in value)
    ):
        return int(value[0]), int(value[1])
    raise TransformersConfigError(
        f"config.json: {name} must be an integer or [height, width], not {value!r}"
    )


def _int(cfg: dict[str, Any], name: str) -> int:
    value = cfg[name]
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise TransformersConfigError(
            f"config.json: {name} must be a positive integer, not {value!r}"
        )
    return value


def model_type_of(config: dict[str, Any]) -> str:
    """The config's ``model_type``, or TransformersConfigError naming the supported ones."""
    if not isinstance(config, dict):
        raise TransformersConfigError("config.json must hold a JSON object")
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        named = f"model_type '{model_type}'" if model_type else "a config without a model_type"
        raise TransformersConfigError(
            f"{named} is not a transformers model vitaudit can map to timm; supported model "
            f"types: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    return str(model_type)


def timm_spec(config: dict[str, Any], preprocessor: dict[str, Any] | None = None) -> TimmSpec:
    """The timm arch and model_args equivalent to a transformers ``config.json``.

    ``preprocessor`` is the folder's ``preprocessor_config.json`` when it has one: its
    ``image_mean``/``image_std`` are the normalisation the model was trained with; without it
    the family's HF default is used. Raises TransformersConfigError for an unsupported model
    type or a setting timm cannot reproduce.
    """
    model_type = model_type_of(config)
    family = model_type
    cfg = dict(config)
    if model_type == "clip":
        vision = config.get("vision_config")
        if not isinstance(vision, dict):
            raise TransformersConfigError("config.json: a clip config needs a vision_config object")
        cfg, family = dict(vision), "clip_vision_model"
    cfg = {**CONFIG_DEFAULTS[family], **{k: v for k, v in cfg.items() if v is not None}}

    dim, depth, heads = (
        _int(cfg, k) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads")
    )
    if dim % heads:
        raise TransformersConfigError(
            f"config.json: hidden_size {dim} is not divisible by num_attention_heads {heads}"
        )
    if cfg["num_channels"] != 3:
        raise TransformersConfigError(
            f"config.json: num_channels is {cfg['num_channels']}; vitaudit audits RGB models (3 channels)"
        )
    act = ACTIVATIONS.get(str(cfg["hidden_act"]))
    if act is None:
        raise TransformersConfigError(
            f"config.json: hidden_act '{cfg['hidden_act']}' has no timm equivalent; supported: "
            + ", ".join(ACTIVATIONS)
        )
    swiglu = family.startswith("dinov2") and bool(cfg["use_swiglu_ffn"])
    if family.startswith("dinov2"):
        hidden = int(dim * float(cfg["mlp_ratio"]))  # as Dinov2MLP sizes it
        if swiglu:
            # Dinov2SwiGLUFFN keeps 2/3 of it, rounded up to a multiple of 8, for the gate and for
            # the value: one packed input layer twice that wide, as timm's SwiGLUPacked has
            hidden = 2 * ((int(hidden * 2 / 3) + 7) // 8 * 8)
            act = "silu"
    else:
        hidden = _int(cfg, "intermediate_size")
    mlp_ratio = hidden / dim
    if int(dim * mlp_ratio) != hidden:  # timm sizes the MLP as int(dim * mlp_ratio)
        mlp_ratio = (hidden + 0.5) / dim

    image, patch = _pair(cfg["image_size"], "image_size"), _pair(cfg["patch_size"], "patch_size")
    if image[0] % patch[0] or image[1] % patch[1]:
        raise TransformersConfigError(
            f"config.json: image_size {image} is not a multiple of patch_size {patch}"
        )
    model_args: dict[str, Any] = {
        "img_size": list(image) if image[0] != image[1] else image[0],
        "patch_size": list(patch) if patch[0] != patch[1] else patch[0],
        "embed_dim": dim,
        "depth": depth,
        "num_heads": heads,
        "mlp_ratio": mlp_ratio,
        "qkv_bias": bool(cfg.get("qkv_bias", True)),
        "act_layer": act,
        "class_token": True,
        "global_pool": "token",
        # explicit, so the named timm model's own defaults cannot change the mapped one
        "reg_tokens": 0,
        "no_embed_class": False,
        "pre_norm": False,
        "init_values": None,
    }
    if family.startswith("dinov2"):
        model_args["init_values"] = float(cfg.get("layerscale_value", 1.0))
        registers = int(cfg["num_register_tokens"]) if family == "dinov2_with_registers" else 0
        model_args["reg_tokens"] = registers
        model_args["no_embed_class"] = registers > 0
    if family == "clip_vision_model":
        model_args["pre_norm"] = True
        model_args["qkv_bias"] = True

    arch = _arch_name(family, dim, depth, heads, patch, image, act)
    mean, std = DEFAULT_NORMALIZATION[family]
    source = f"the default of transformers' {family} image processor"
    if preprocessor and (preprocessor.get("image_mean") or preprocessor.get("image_std")):
        source = "preprocessor_config.json"
        mean = _triple(preprocessor.get("image_mean") or mean, "image_mean")
        std = _triple(preprocessor.get("image_std") or std, "image_std")
    architectures = config.get("architectures") or []
    return TimmSpec(
        mlp_layer="swiglu" if swiglu else "mlp",
        model_type=model_type,
        arch=arch,
        model_args=model_args,
        layer_norm_eps=float(cfg["layer_norm_eps"]),
        mean=tuple(float(m) for m in mean),
        std=tuple(float(s) for s in std),
        normalization_source=source,
        architectures=[str(a) for a in architectures] if isinstance(architectures, list) else [],
    )


def _triple(value: Any, name: str) -> tuple[float, float, float]:
    """An RGB triple from a preprocessor config (one number means the same for each channel)."""
    values = [value] * 3 if isinstance(value, (int, float)) else value
    if (
        not isinstance(values, (list, tuple))
        or len(values) != 3
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    ):
        raise TransformersConfigError(
            f"preprocessor_config.json: {name} must be 3 numbers, not {value!r}"
        )
    if name == "image_std" and min(values) <= 0:
        raise TransformersConfigError(
            f"preprocessor_config.json: image_std must be positive, not {value!r}"
        )
    return float(values[0]), float(values[1]), float(values[2])


def _arch_name(
    family: str,
    dim: int,
    depth: int,
    heads: int,
    patch: tuple[int, int],
    image: tuple[int, int],
    act: str,
) -> str:
    size = SIZES.get((dim, depth, heads))
    square = patch[0] == patch[1] and image[0] == image[1]
    candidate = None
    if size and square:
        p, i = patch[0], image[0]
        candidate = {
            "vit": f"vit_{size}_patch{p}_{i}",
            "deit": f"deit_{size}_distilled_patch{p}_{i}",
            "dinov2": f"vit_{size}_patch{p}_dinov2",
            "dinov2_with_registers": f"vit_{size}_patch{p}_reg4_dinov2",
            "clip_vision_model": f"vit_{size}_patch{p}_clip_{'quickgelu_' if act == 'quick_gelu' else ''}{i}",
        }[family]
    return candidate if candidate in KNOWN_ARCHS else BASE_ARCHS[family]


def timm_state_dict(spec: TimmSpec, state_dict: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Rename a transformers state dict to timm's, fusing q/k/v into ``qkv``.

    Returns the new state dict (the input is not modified) and notes on what was left out or
    rearranged. Raises TransformersConfigError naming keys that match no rule, and for a head
    timm cannot reproduce (Dinov2ForImageClassification's class + mean-patch head).
    """
    import torch

    notes: list[str] = []
    out: dict[str, Any] = {}
    qkv: dict[tuple[str, str], dict[str, Any]] = {}
    heads: dict[str, Any] = {}
    dropped: list[str] = []
    unknown: list[str] = []
    for name, tensor in state_dict.items():
        key = name
        if (
            spec.model_type == "clip"
            and not key.startswith("vision_model.")
            and not key.startswith("visual_projection.")
        ):
            dropped.append(name)
            continue
        for prefix in PREFIXES:
            key = key.removeprefix(prefix)
        head = key.split(".", 1)[0]
        if head in HEAD_KEYS:
            heads[key] = tensor
            continue
        if DROPPED.match(key):
            dropped.append(name)
            continue
        match = QKV_PATTERN.match(key)
        if match:
            block, long_name, short_name, kind = match.groups()
            part = "qkv".index((long_name or short_name)[0])
            qkv.setdefault((block, kind), {})[part] = tensor
            continue
        for pattern, replacement in RENAMES:
            new, count = re.subn(pattern, replacement, key)
            if count:
                out[new] = tensor
                break
        else:
            unknown.append(name)
    if unknown:
        raise TransformersConfigError(
            f"the {spec.model_type} state dict has keys the mapping does not know: "
            + ", ".join(unknown[:8])
            + (f" and {len(unknown) - 8} more" if len(unknown) > 8 else "")
        )
    for (block, kind), parts in sorted(qkv.items()):
        if sorted(parts) != [0, 1, 2]:
            raise TransformersConfigError(f"block {block} lacks one of its query/key/value {kind}s")
        out[f"blocks.{block}.attn.qkv.{kind}"] = torch.cat([parts[0], parts[1], parts[2]], dim=0)
    if "cls_token" in out and out["cls_token"].ndim == 1:  # CLIP's class_embedding (D,)
        out["cls_token"] = out["cls_token"].reshape(1, 1, -1)
    if "pos_embed" in out and out["pos_embed"].ndim == 2:  # CLIP's nn.Embedding (N, D)
        out["pos_embed"] = out["pos_embed"].unsqueeze(0)
    if spec.model_args.get("no_embed_class") and "pos_embed" in out:
        # registers carry no position in HF: the class row goes into the class token (timm's reg4 layout)
        pos = out["pos_embed"]
        out["cls_token"] = out["cls_token"] + pos[:, :1]
        out["pos_embed"] = pos[:, 1:]
        notes.append(
            "transformers: the position table's class-token row was added to the class token "
            "(registers carry no position; timm's no_embed_class layout); the patch rows are as stored"
        )
    out.update(_map_heads(spec, heads, notes))
    if dropped:
        notes.append(
            "transformers: left out, no part of the timm model: "
            + ", ".join(sorted({_summary(d) for d in dropped}))
        )
    return out, notes


def _summary(name: str) -> str:
    """A dropped key as the notes name it: the text tower as a whole, others by module."""
    if name.startswith(("text_model.", "text_projection.")):
        return name.split(".", 1)[0]
    return re.sub(r"\.(weight|bias)$", "", name)


def _map_heads(spec: TimmSpec, heads: dict[str, Any], notes: list[str]) -> dict[str, Any]:
    import torch

    names = {k.rsplit(".", 1)[0] for k in heads}
    if not names:
        return {}
    if spec.model_type.startswith("dinov2"):
        raise TransformersConfigError(
            "Dinov2ForImageClassification's head (class token concatenated with the mean patch "
            "token) has no timm equivalent; save the backbone (Dinov2Model) and audit that"
        )
    if names == {"visual_projection"}:
        weight = heads["visual_projection.weight"]
        notes.append(
            "transformers: visual_projection is the timm head (bias 0): logits are the image embedding"
        )
        return {
            "head.weight": weight,
            "head.bias": torch.zeros(weight.shape[0], dtype=weight.dtype),
        }
    if names == {"classifier"} and spec.model_type == "vit":
        return {"head.weight": heads["classifier.weight"], "head.bias": heads["classifier.bias"]}
    if names == {"cls_classifier", "distillation_classifier"}:
        return {
            "head.weight": heads["cls_classifier.weight"],
            "head.bias": heads["cls_classifier.bias"],
            "head_dist.weight": heads["distillation_classifier.weight"],
            "head_dist.bias": heads["distillation_classifier.bias"],
        }
    if names == {"classifier"} and spec.model_type == "deit":
        notes.append(
            "transformers: DeiTForImageClassification reads the class token only; timm's distilled "
            "model averages two heads, so head = 2 x classifier and head_dist = 0 (the same logits)"
        )
        weight, bias = heads["classifier.weight"], heads["classifier.bias"]
        return {
            "head.weight": 2 * weight,
            "head.bias": 2 * bias,
            "head_dist.weight": torch.zeros_like(weight),
            "head_dist.bias": torch.zeros_like(bias),
        }
    raise TransformersConfigError(
        f"the {spec.model_type} checkpoint has a head timm cannot reproduce: {', '.join(sorted(names))}"
    )

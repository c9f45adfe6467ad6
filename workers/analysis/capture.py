"""Streaming capture of attention from timm Vision Transformers, with or without gradients.

timm's fused attention (``F.scaled_dot_product_attention``) never materialises the
probabilities, so nothing can be hooked after the softmax. Both paths, fused and explicit,
call ``attn.q_norm(q)`` and ``attn.k_norm(k)`` on (B, heads, tokens, head_dim) tensors just
before the product (identities unless the model uses ``qk_norm=True``; then the norm output
is exactly what enters the product). Forward hooks on those two named modules therefore
see the Q and K that the block uses, and the probabilities are rebuilt as

    P = softmax(Q K^T * attn.scale)        (Vaswani et al. 2017, eq. 1; scale = head_dim^-0.5)

per layer, inside the ``k_norm`` hook, and handed to a callback that reduces them before
the next layer runs. Only one layer's (B, heads, tokens, tokens) tensor lives at a time, so
peak memory depends on the batch size, never on the number of images.

The same context (`attention_capture`) serves the gradient analysis: with
``with_gradients=True`` it runs the explicit path and keeps each layer's graph tensors
(pre-norm and post-norm Q/K, the probabilities as ``attn.attn_drop`` sees them) so that
gradient hooks can be registered on them; the head statistics and the gradients then see
one capture of the same forward.

Supported attention: ``timm.layers.Attention`` (ViT, DeiT, DINOv2 with registers, ViTs with
``qk_norm``) and ``ParallelScalingBlock`` (ViT-XP, "pwee": the same product, q/k normalised
before the heads are moved first). ``ParallelThingsBlock`` runs several attentions side by
side in one block and is refused, as is differential attention. Variants that change Q or K after the norms (rotary embeddings, differential
attention) are refused rather than measured wrongly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

AttentionCallback = Callable[[int, Tensor], None]
"""``callback(layer, probs)`` with probs (B, heads, tokens, tokens) float32, rows sum to 1."""

BatchAttentionCallback = Callable[[int, Tensor, int], None]
"""``callback(layer, probs, start)``: as `AttentionCallback`, plus the index of the batch's
first image in the stream of images."""


@dataclass(frozen=True)
class AttentionSite:
    """One hooked attention module: its layer index and dotted name in the model."""

    layer: int
    name: str
    module: nn.Module
    # ParallelScalingBlock normalises q/k as (B, tokens, heads, head_dim), before the
    # transpose; the hooks move the heads first so every site hands on (B, heads, T, d).
    tokens_first: bool = False


def attention_sites(model: nn.Module) -> list[AttentionSite]:
    """The attention module of every block of a timm ViT, in depth order.

    A ``ParallelScalingBlock`` is its own attention site (its ``q_norm``/``k_norm`` see
    (B, tokens, heads, head_dim); ``tokens_first`` marks it). Raises ``ValueError`` when
    the model has no ``blocks``, when a block has no ``attn``
    with ``q_norm``/``k_norm`` (so no Q/K can be observed), or when a block's attention is
    not ``timm.layers.Attention`` (its Q/K could be changed after the norms).
    """
    from timm.layers import Attention
    from timm.models.vision_transformer import ParallelScalingBlock

    blocks = getattr(model, "blocks", None)
    if blocks is None or len(blocks) == 0:
        raise ValueError("model has no `blocks`; is it a timm Vision Transformer?")
    sites = []
    for i, block in enumerate(blocks):
        if type(block) is ParallelScalingBlock:  # the block is its own attention
            sites.append(AttentionSite(i, f"blocks.{i}", block, tokens_first=True))
            continue
        attn = getattr(block, "attn", None)
        if attn is None or not hasattr(attn, "q_norm") or not hasattr(attn, "k_norm"):
            raise ValueError(
                f"blocks.{i} has no attn.q_norm / attn.k_norm to hook; "
                f"block type {type(block).__name__} is not supported"
                + (
                    " (its attentions run in parallel, so one layer has no single map)"
                    if hasattr(block, "attns")
                    else ""
                )
            )
        if type(attn) is not Attention:
            raise ValueError(
                f"blocks.{i}.attn is {type(attn).__name__}; attention capture supports "
                "timm.layers.Attention only (other variants change Q/K after the norms)"
            )
        sites.append(AttentionSite(i, f"blocks.{i}.attn", attn))
    return sites


def attention_probs(q: Tensor, k: Tensor, scale: float) -> Tensor:
    """softmax(q k^T * scale) over the last dim, in float32: (B, H, T, d) x2 -> (B, H, T, T)."""
    if q.shape != k.shape or q.ndim != 4:
        raise ValueError(
            f"q and k must both be (B, H, T, d), got {tuple(q.shape)}, {tuple(k.shape)}"
        )
    # float32 also under autocast (option precision=bf16): only the model runs in bf16;
    # an observation, so without autograd (the softmax below works in place)
    with torch.autocast(device_type=q.device.type, enabled=False), torch.no_grad():
        probs = (q.float() * scale) @ k.float().transpose(-2, -1)
        # softmax in place: one (B, H, T, T) buffer, not two (120 MB less per image at 16
        # heads and 1,370 tokens)
        probs.sub_(probs.amax(dim=-1, keepdim=True)).exp_()
        return probs.div_(probs.sum(dim=-1, keepdim=True))


@contextmanager
def _explicit(modules: Sequence[nn.Module]) -> Iterator[None]:
    saved = [(m, m.__dict__.get("fused_attn"), hasattr(m, "fused_attn")) for m in modules]
    try:
        for module, _, had in saved:
            if had:
                module.fused_attn = False
        yield
    finally:
        for module, value, had in saved:
            if not had:
                continue
            if value is None:  # the flag lived on the class; drop our instance override
                module.__dict__.pop("fused_attn", None)
            else:
                module.fused_attn = value


@contextmanager
def explicit_attention(model: nn.Module) -> Iterator[None]:
    """timm's explicit attention path (``fused_attn = False``) in every module that has the
    flag (the blocks' attention, and attention pools such as SigLIP's MAP head) for the
    duration, without hooks; each flag is put back exactly as found (an instance attribute
    or the class default), also when the body raises. Forward-mode autodiff needs it: the
    fused CPU kernels have no forward derivative."""
    with _explicit([m for m in model.modules() if hasattr(m, "fused_attn")]):
        yield


@dataclass
class LayerTaps:
    """One block's attention tensors as the last forward made them (gradient capture).

    Graph tensors, not detached, so a caller can register gradient hooks on them:
    ``q_pre``/``k_pre`` enter ``attn.q_norm``/``attn.k_norm`` (the qkv projection's output),
    ``q``/``k`` leave them (what enters ``s = Q K^T * scale``), ``probs`` is the softmax
    output as ``attn.attn_drop`` sees it. ``calls`` counts the probabilities seen since the
    last `AttentionCapture.reset` (1 per forward on timm's explicit path).
    """

    q_pre: Tensor | None = None
    k_pre: Tensor | None = None
    q: Tensor | None = None
    k: Tensor | None = None
    probs: Tensor | None = None
    calls: int = 0


@dataclass
class AttentionCapture:
    """What `attention_capture` yields: the hooked sites, their module names and (with
    gradients) each selected layer's `LayerTaps`, in the order of ``sites``."""

    sites: list[AttentionSite]
    names: list[str] = field(default_factory=list)
    taps: list[LayerTaps] = field(default_factory=list)

    def reset(self) -> None:
        """Forget the last forward's tensors (call before each forward)."""
        self.taps = [LayerTaps() for _ in self.sites]


@contextmanager
def attention_capture(
    model: nn.Module,
    callback: AttentionCallback | None = None,
    *,
    layers: Sequence[int] | None = None,
    explicit: bool = False,
    with_gradients: bool = False,
) -> Iterator[AttentionCapture]:
    """Observe every selected layer's attention on every forward inside the block.

    Without gradients (the default), ``callback(layer, probs)`` receives probabilities
    rebuilt from the hooked Q and K, detached; this works on the fused and the explicit
    path alike. ``explicit=True`` switches the blocks to timm's explicit attention path for
    the duration (``fused_attn = False``; changes logits by about 1e-6); the default leaves
    the model's path as it is, because the hooks see the same Q and K on both paths.

    With ``with_gradients=True`` the explicit path is forced (``attn.attn_drop`` then sees
    the probabilities the model differentiates) and each forward fills
    ``capture.taps[i]`` with the graph tensors of the i-th selected layer (see
    `LayerTaps`); ``callback``, when given, receives those probabilities detached. Call
    ``capture.reset()`` before each forward.

    Yields an `AttentionCapture` (``names``: the hooked modules). ``layers`` selects block
    indices (default: all); one that matches no block raises. Hooks are removed and each
    block's ``fused_attn`` put back exactly as found (an instance attribute or the class
    default) in ``finally``, also when the body raises.
    """
    sites = attention_sites(model)
    if layers is not None:
        known = {s.layer for s in sites}
        missing = sorted(set(layers) - known)
        if missing:
            raise ValueError(f"layers {missing} match no block (model has {len(sites)} blocks)")
        sites = [s for s in sites if s.layer in set(layers)]

    capture = AttentionCapture(sites)
    capture.reset()
    handles: list[torch.utils.hooks.RemovableHandle] = []
    scales = {s.layer: float(s.module.scale) for s in sites}

    def probs_of(layer: int, q: Tensor, k: Tensor) -> None:
        if callback is not None:
            callback(layer, attention_probs(q, k, scales[layer]))

    def tap_hook(index: int, which: str) -> Callable:
        def hook(_module: nn.Module, inputs: tuple, output: Tensor) -> None:
            taps = capture.taps[index]
            if which == "probs":
                taps.probs = output
                taps.calls += 1
                if callback is not None:
                    callback(sites[index].layer, output.detach())
            else:
                setattr(taps, f"{which}_pre", inputs[0])
                setattr(taps, which, output)

        return hook

    explicit_modules = [s.module for s in sites] if explicit or with_gradients else []
    try:
        if with_gradients:
            for index, site in enumerate(sites):
                attn = site.module
                handles.append(attn.q_norm.register_forward_hook(tap_hook(index, "q")))
                handles.append(attn.k_norm.register_forward_hook(tap_hook(index, "k")))
                handles.append(attn.attn_drop.register_forward_hook(tap_hook(index, "probs")))
                capture.names += [f"{site.name}.{n}" for n in ("q_norm", "k_norm", "attn_drop")]
            with _explicit(explicit_modules):
                yield capture
        else:
            with qk_capture(model, probs_of, sites=sites) as names, _explicit(explicit_modules):
                capture.names += names
                yield capture
    finally:
        for handle in handles:
            handle.remove()
        capture.reset()


@contextmanager
def qk_capture(
    model: nn.Module,
    callback: Callable[[int, Tensor, Tensor], None],
    *,
    sites: Sequence[AttentionSite] | None = None,
) -> Iterator[list[str]]:
    """Call ``callback(layer, q, k)`` with every block's Q and K, (B, heads, tokens, head_dim),
    detached, as they enter the logits (outputs of ``attn.q_norm`` / ``attn.k_norm``, before
    ``attn.scale``), on every forward inside, fused or explicit path alike. ``sites``
    defaults to `attention_sites` (which refuses blocks whose Q/K could change after the
    norms). Yields the hooked module names; the hooks are removed in ``finally``."""
    sites = attention_sites(model) if sites is None else sites
    handles = []
    pending: dict[int, Tensor] = {}

    def heads_first(output: Tensor, tokens_first: bool) -> Tensor:
        # ParallelScalingBlock normalises (B, tokens, heads, d); the logits read (B, heads, ...)
        return (output.transpose(1, 2) if tokens_first else output).detach()

    def q_hook(layer: int, tokens_first: bool) -> Callable:
        def hook(_module: nn.Module, _inputs: tuple, output: Tensor) -> None:
            pending[layer] = heads_first(output, tokens_first)

        return hook

    def k_hook(layer: int, tokens_first: bool) -> Callable:
        def hook(_module: nn.Module, _inputs: tuple, output: Tensor) -> None:
            q = pending.pop(layer, None)
            if q is None:
                raise RuntimeError(f"layer {layer}: k_norm ran without q_norm before it")
            callback(layer, q, heads_first(output, tokens_first))

        return hook

    try:
        for site in sites:
            first = site.tokens_first
            handles.append(site.module.q_norm.register_forward_hook(q_hook(site.layer, first)))
            handles.append(site.module.k_norm.register_forward_hook(k_hook(site.layer, first)))
        yield [f"{s.name}.{n}" for s in sites for n in ("q_norm", "k_norm")]
    finally:
        for handle in handles:
            handle.remove()
        pending.clear()


def iter_batches(images: Tensor | Iterable[Tensor], batch_size: int) -> Iterator[Tensor]:
    """Re-batch images to at most ``batch_size`` per batch, without collecting them all.

    ``images`` is one (M, C, H, W) tensor or an iterable of (C, H, W) images and/or
    (b, C, H, W) batches; they are yielded in order, in batches of ``batch_size`` (the
    last one may be smaller).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if isinstance(images, Tensor):
        if images.ndim != 4:
            raise ValueError(f"images must be (M, C, H, W), got {tuple(images.shape)}")
        yield from images.split(batch_size)
        return
    buffer: list[Tensor] = []
    count = 0
    for item in images:
        if not isinstance(item, Tensor) or item.ndim not in (3, 4):
            shape = tuple(item.shape) if isinstance(item, Tensor) else type(item).__name__
            raise ValueError(f"each item must be a (C, H, W) or (b, C, H, W) tensor, got {shape}")
        item = item[None] if item.ndim == 3 else item
        for chunk in item.split(batch_size):
            buffer.append(chunk)
            count += chunk.shape[0]
            while count >= batch_size:
                merged = torch.cat(buffer)
                yield merged[:batch_size]
                rest = merged[batch_size:]
                buffer, count = ([rest] if rest.shape[0] else []), rest.shape[0]
    if count:
        yield torch.cat(buffer)


@contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """Eval mode for the block; every submodule's own mode is put back afterwards.

    ``model.train(was_training)`` would set every submodule to the top-level flag, changing
    a model whose modules had mixed modes.
    """
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for module, training in modes.items():
            module.training = training


def stream_attention(
    model: nn.Module,
    images: Tensor | Iterable[Tensor],
    callback: BatchAttentionCallback,
    *,
    batch_size: int,
    layers: Sequence[int] | None = None,
    prepare: Callable[[Tensor], Tensor] | None = None,
) -> int:
    """Run ``model`` over ``images`` and hand each layer's probabilities to ``callback``.

    ``callback(layer, probs, start)`` receives probs (B', heads, tokens, tokens) float32 for
    the batch whose first image is image number ``start`` of the stream. ``prepare`` (if
    given) maps each batch, already on the model's device, to what the model runs on (for
    example the batch followed by a filtered copy, so B' = 2B). The model runs in eval mode
    under ``torch.no_grad`` (its train/eval mode is restored afterwards). Returns the number
    of images.
    """
    device = next(model.parameters()).device
    current = {"start": 0}

    def on_attention(layer: int, probs: Tensor) -> None:
        callback(layer, probs, current["start"])

    total = 0
    with evaluating(model), attention_capture(model, on_attention, layers=layers), torch.no_grad():
        for batch in iter_batches(images, batch_size):
            batch = batch.to(device)
            current["start"] = total
            model(prepare(batch) if prepare is not None else batch)
            total += batch.shape[0]
    return total

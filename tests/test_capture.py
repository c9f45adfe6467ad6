"""Attention capture: the rebuilt maps are the model's own, capture leaves no trace, and it streams."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from timm.models.vision_transformer import VisionTransformer  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from workers.analysis.capture import (  # noqa: E402
    attention_capture,
    attention_probs,
    attention_sites,
    iter_batches,
    stream_attention,
)

# Rebuilt probabilities vs the ones timm's explicit path computes: the same float32 ops on
# the same Q and K, up to rounding in the matmul/softmax (measured ~1e-7).
CAPTURE_ATOL = 1e-6
# Maps captured on the fused path vs the explicit path's: earlier blocks' outputs differ by
# the fused kernel's rounding (~1e-6, NOTES.md), amplified by the large test weights.
FUSED_VS_EXPLICIT_ATOL = 1e-4
# The explicit formula written out here in float64 vs the float32 capture.
FORMULA_ATOL = 1e-5

torch.set_num_threads(1)


def small_vit(*, seed: int = 0, **kwargs) -> VisionTransformer:
    torch.manual_seed(seed)
    options = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=4)
    options.update(kwargs)
    return VisionTransformer(**options).eval()


MODEL_VARIANTS = {
    "plain": {},
    "qk_norm": {"qk_norm": True},
    "registers_no_embed_class": {"reg_tokens": 4, "no_embed_class": True},
    "non_square": {"img_size": (24, 40)},
}


def _sharpen(model: nn.Module) -> None:
    """Large qkv weights so the maps are far from uniform (a weak test otherwise)."""
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for block in model.blocks:
            w = block.attn.qkv.weight
            w.copy_(torch.randn(w.shape, generator=generator) * 0.5)
            if isinstance(block.attn.q_norm, nn.LayerNorm):
                block.attn.q_norm.weight.normal_(1.0, 0.5)
                block.attn.k_norm.bias.normal_(0.0, 0.5)


def _linear64(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    bias = None if layer.bias is None else layer.bias.double()
    return nn.functional.linear(x.double(), layer.weight.double(), bias)


def _norm64(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if isinstance(norm, nn.Identity):
        return x
    if not isinstance(norm, nn.LayerNorm):
        raise TypeError(f"no float64 formula for {type(norm).__name__}")
    return nn.functional.layer_norm(
        x, norm.normalized_shape, norm.weight.double(), norm.bias.double(), norm.eps
    )


def _images(model: VisionTransformer, count: int, seed: int = 1) -> torch.Tensor:
    h, w = model.patch_embed.img_size
    return torch.randn(count, 3, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("variant", sorted(MODEL_VARIANTS))
def test_captured_maps_equal_the_explicit_path_and_formula(variant: str) -> None:
    model = small_vit(**MODEL_VARIANTS[variant])
    _sharpen(model)
    x = _images(model, 3)
    captured: dict[int, torch.Tensor] = {}
    with torch.no_grad(), attention_capture(model, captured.__setitem__):
        model(x)  # fused path

    # What timm's explicit path feeds into attn @ v (attn_drop is the identity in eval).
    explicit: dict[int, torch.Tensor] = {}
    inputs: dict[int, torch.Tensor] = {}
    handles = []
    for i, block in enumerate(model.blocks):
        block.attn.fused_attn = False
        handles.append(
            block.attn.attn_drop.register_forward_hook(
                lambda _m, _i, out, i=i: explicit.__setitem__(i, out)
            )
        )
        handles.append(
            block.attn.register_forward_pre_hook(
                lambda _m, args, i=i: inputs.__setitem__(i, args[0])
            )
        )
    captured_explicit: dict[int, torch.Tensor] = {}
    with torch.no_grad(), attention_capture(model, captured_explicit.__setitem__):
        model(x)
    for h in handles:
        h.remove()

    num_tokens = model.num_prefix_tokens + model.patch_embed.num_patches
    for i, block in enumerate(model.blocks):
        attn = block.attn
        assert captured[i].shape == (3, attn.num_heads, num_tokens, num_tokens)
        torch.testing.assert_close(captured_explicit[i], explicit[i], atol=CAPTURE_ATOL, rtol=0)
        # The fused run differs only by the fused kernel's rounding in earlier layers.
        torch.testing.assert_close(captured[i], explicit[i], atol=FUSED_VS_EXPLICIT_ATOL, rtol=0)
        # softmax(Q K^T / sqrt(d)) written out from the block's input, in float64.
        with torch.no_grad():
            b, t, _ = inputs[i].shape
            qkv = _linear64(attn.qkv, inputs[i]).reshape(b, t, 3, attn.num_heads, attn.head_dim)
            q, k, _v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
            q, k = _norm64(attn.q_norm, q), _norm64(attn.k_norm, k)
            formula = (q @ k.transpose(-2, -1) / attn.head_dim**0.5).softmax(-1)
        torch.testing.assert_close(
            captured_explicit[i].double(), formula, atol=FORMULA_ATOL, rtol=0
        )
        assert captured[i].max() > 0.2  # maps are not near uniform: the check has teeth


def test_qk_norm_output_is_what_enters_the_product() -> None:
    """With qk_norm the maps built from the pre-norm Q/K differ; the capture uses the norm output."""
    model = small_vit(qk_norm=True)
    _sharpen(model)
    x = _images(model, 2)
    captured: dict[int, torch.Tensor] = {}
    raw: dict[str, torch.Tensor] = {}
    attn = model.blocks[0].attn
    handles = [
        attn.q_norm.register_forward_hook(lambda _m, args, _o: raw.__setitem__("q", args[0])),
        attn.k_norm.register_forward_hook(lambda _m, args, _o: raw.__setitem__("k", args[0])),
    ]
    with torch.no_grad(), attention_capture(model, captured.__setitem__, layers=[0]):
        model(x)
    for h in handles:
        h.remove()
    assert set(captured) == {0}
    attn.fused_attn = False
    explicit = {}
    handle = attn.attn_drop.register_forward_hook(lambda _m, _i, out: explicit.__setitem__(0, out))
    with torch.no_grad():
        model(x)
    handle.remove()
    torch.testing.assert_close(captured[0], explicit[0], atol=CAPTURE_ATOL, rtol=0)
    # Maps rebuilt from the pre-norm Q/K would be wrong by far more than the tolerance.
    from_raw = attention_probs(raw["q"], raw["k"], attn.scale)
    assert (from_raw - explicit[0]).abs().max() > 100 * CAPTURE_ATOL


@pytest.mark.parametrize("explicit", [False, True])
def test_fused_output_is_unchanged_and_capture_leaves_no_trace(explicit: bool) -> None:
    model = small_vit()
    x = _images(model, 2)
    flags = [b.attn.fused_attn for b in model.blocks]
    assert all(flags)  # timm's default: the fused path is what we protect
    with torch.no_grad():
        before = model(x)
        with attention_capture(model, lambda _l, _p: None, explicit=explicit) as capture:
            assert capture.names == [
                f"blocks.{i}.attn.{n}" for i in range(2) for n in ("q_norm", "k_norm")
            ]
            assert [b.attn.fused_attn for b in model.blocks] == [not explicit] * 2
            during = model(x)
        after = model(x)
    if explicit:
        torch.testing.assert_close(during, before, atol=1e-5, rtol=0)  # explicit path: ~1e-6
    else:
        assert torch.equal(during, before)
    assert torch.equal(after, before)
    assert [b.attn.fused_attn for b in model.blocks] == flags
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks


def test_gradient_capture_keeps_the_graph_tensors_the_model_differentiates() -> None:
    model = small_vit(qk_norm=True)
    x = _images(model, 2)
    flags = [b.attn.fused_attn for b in model.blocks]
    seen: dict[int, Tensor] = {}
    with attention_capture(model, seen.__setitem__, with_gradients=True) as capture:
        assert [b.attn.fused_attn for b in model.blocks] == [False, False]
        assert capture.names[:3] == [
            f"blocks.0.attn.{n}" for n in ("q_norm", "k_norm", "attn_drop")
        ]
        capture.reset()
        out = model(x)
        for site, taps in zip(capture.sites, capture.taps, strict=True):
            assert taps.calls == 1 and taps.probs.requires_grad
            # The tapped probabilities are the softmax of the tapped post-norm Q and K ...
            rebuilt = attention_probs(taps.q, taps.k, site.module.scale)
            torch.testing.assert_close(taps.probs, rebuilt, atol=CAPTURE_ATOL, rtol=0)
            # ... and the pre-norm tensors differ from them (q_norm is a real LayerNorm).
            assert (taps.q_pre - taps.q).abs().max() > 1e-3
            assert torch.equal(seen[site.layer], taps.probs.detach())
            assert not seen[site.layer].requires_grad
        # The tapped probabilities are in the graph: the output's gradient reaches them.
        (grad,) = torch.autograd.grad(out.sum(), capture.taps[0].probs)
        assert grad.abs().sum() > 0
    assert capture.taps[0].probs is None  # nothing is kept after the block
    assert [b.attn.fused_attn for b in model.blocks] == flags
    assert all("fused_attn" not in b.attn.__dict__ or b.attn.fused_attn for b in model.blocks)
    assert not any(m._forward_hooks for m in model.modules())


def test_hooks_are_removed_and_flags_restored_when_the_body_raises() -> None:
    model = small_vit()
    with (
        pytest.raises(RuntimeError, match="boom"),
        attention_capture(model, lambda _l, _p: None, explicit=True),
    ):
        raise RuntimeError("boom")
    assert all(b.attn.fused_attn for b in model.blocks)
    assert not any(m._forward_hooks for m in model.modules())


def test_a_layer_that_matches_no_block_raises() -> None:
    model = small_vit()
    with (
        pytest.raises(ValueError, match=r"layers \[5\] match no block"),
        attention_capture(model, lambda _l, _p: None, layers=[0, 5]),
    ):
        pass
    assert not any(m._forward_hooks for m in model.modules())


def test_models_that_cannot_be_captured_are_refused() -> None:
    with pytest.raises(ValueError, match="no `blocks`"):
        attention_sites(nn.Linear(3, 3))
    model = small_vit()
    model.blocks[1].attn = nn.Identity()
    with pytest.raises(ValueError, match="blocks.1 has no attn.q_norm"):
        attention_sites(model)

    class Rotary(type(small_vit().blocks[0].attn)):  # changes Q/K after the norms, say
        pass

    model = small_vit()
    model.blocks[0].attn.__class__ = Rotary
    with pytest.raises(ValueError, match="supports timm.layers.Attention only"):
        attention_sites(model)


def test_stream_pulls_images_lazily_and_calls_back_per_layer_and_batch() -> None:
    """Memory is bounded by the batch: the stream never reads ahead of the batch it runs."""
    model = small_vit()
    images = _images(model, 7)
    pulled = []

    def source():
        for i in range(images.shape[0]):
            pulled.append(i)
            yield images[i]

    calls = []

    def callback(layer: int, probs: torch.Tensor, start: int) -> None:
        # At most the current batch has been read when its attention is reduced.
        assert len(pulled) <= start + 3
        calls.append((layer, probs.shape[0], start))

    total = stream_attention(model, source(), callback, batch_size=3)
    assert total == 7
    assert calls == [(0, 3, 0), (1, 3, 0), (0, 3, 3), (1, 3, 3), (0, 1, 6), (1, 1, 6)]
    assert not any(m._forward_hooks for m in model.modules())


def test_stream_restores_training_mode() -> None:
    model = small_vit().train()
    stream_attention(model, _images(model, 2), lambda *_: None, batch_size=2)
    assert model.training


@settings(max_examples=30, deadline=None)
@given(
    chunks=st.lists(st.integers(min_value=0, max_value=5), min_size=1, max_size=6),
    batch_size=st.integers(min_value=1, max_value=4),
)
def test_iter_batches_rebatches_without_losing_or_reordering(
    chunks: list[int], batch_size: int
) -> None:
    total = sum(chunks)
    data = torch.arange(float(total)).view(total, 1, 1, 1)
    pieces, offset = [], 0
    for size in chunks:
        piece = data[offset : offset + size]
        # single images arrive as (C, H, W), larger chunks as batches
        pieces.append(piece[0] if size == 1 else piece)
        offset += size
    pieces = [p for p in pieces if p.numel()]
    batches = list(iter_batches(pieces, batch_size))
    assert all(b.shape[0] == batch_size for b in batches[:-1])
    if batches:
        assert 1 <= batches[-1].shape[0] <= batch_size
        assert torch.equal(torch.cat(batches), data)
    else:
        assert total == 0


def test_iter_batches_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="batch_size"):
        list(iter_batches(torch.zeros(2, 3, 4, 4), 0))
    with pytest.raises(ValueError, match=r"\(M, C, H, W\)"):
        list(iter_batches(torch.zeros(3, 4, 4), 2))
    with pytest.raises(ValueError, match="each item"):
        list(iter_batches([torch.zeros(4, 4)], 2))


def test_stream_attention_puts_back_each_submodules_mode() -> None:
    """A model with mixed train/eval submodules comes back exactly as it was."""
    from tests.planted.models import tiny_vit
    from workers.analysis.capture import stream_attention

    model = tiny_vit()
    model.train()
    model.blocks[0].eval()  # mixed modes, as a caller might leave them
    before = {name: module.training for name, module in model.named_modules()}
    stream_attention(model, torch.zeros(2, 3, 32, 32), lambda *_: None, batch_size=2)
    assert {name: module.training for name, module in model.named_modules()} == before

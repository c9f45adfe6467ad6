"""Planted models and tasks for the gradient-alignment analysis, built so the answer is known.

The "marker" task: every image is a grid of flat patches. Channel 0 holds a random bit
``a_i = +-1`` per patch, channel 1 marks exactly one patch (the *marker*). The label is the
bit of one *target* patch at a fixed offset from the marker:

- ``"near"``: the target is the marker's right-hand neighbour (distance 1);
- ``"far"``: the target is ``(+3, +3)`` rows/cols away, wrapping around the 6x6 grid, so it
  is always ``sqrt(18) = 4.24`` patches away (distance bin 4 of bins 0..7).

So the label depends on two patches: the marker and its target, near or far.

The planted model (:func:`marker_readout_vit`) is a one-block timm ``VisionTransformer``
whose weights are set by hand so that its gradient is known in closed form:

- attention is almost uniform (Q and K read only the random position channels through a
  small weight ``eps``), and head 0's value copies the bit channel into channel C;
- the MLP is a ReLU gate that passes channel C only at the marker token
  (``f = relu(c + B(m - 1)) - relu(-c + B(m - 1))``), and the classifier reads the mean of f.

Hence only the marker token ``m`` receives a gradient, ``dL/do_m = (2k/N)(p - y) e_C``, and
the logit pressure on its row is ``-G_mj = P_mj (2k/N)(y - p)(a_j - o_m)``: in expectation
positive for the target (``y`` and ``a_target`` agree) and slightly negative for every other
key (rows of G sum to zero). The loss therefore asks the marker to attend to its *target*,
near or far, and since ``s_ij = eps^2 * scale * pos_i . pos_j`` the same gradient pulls the
marker's and the target's position embeddings together. The model is the same for both
tasks; only the labels differ, so the pattern can only come from the task.

LayerNorms are replaced by identities so the weights above mean what they say; every
module the analysis observes (``attn.q_norm``, ``attn.k_norm``, ``attn.attn_drop``,
``attn.qkv``, ``pos_embed``) is timm's own.
"""

from __future__ import annotations

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

GRID = 6  # 6x6 patches
PATCH = 2  # pixels per patch side
EMBED = 20  # channels: 0 bit, 1 marker, 2 copy, 3 feature, 4..19 position
HEADS = 2
HEAD_DIM = EMBED // HEADS
_A, _M, _C, _F, _POS = 0, 1, 2, 3, 4
POS_DIMS = EMBED - _POS
FAR_OFFSET = (3, 3)
# Q/K weight on the position channels: s_ij ~ eps^2 * 8 / sqrt(10) stays well below 1, so
# attention is nearly uniform and the analysis sees the gradient "before learning".
QK_EPS = 0.3
# Gate bias: larger than any |channel C| (a mean of +-1 bits), so non-marker tokens are off.
GATE = 2.0  # |channel C| <= 1: it is the mean over heads of attention-weighted +-1 bits


def marker_readout_vit(*, seed: int = 0) -> VisionTransformer:
    """The hand-set one-block ViT described in the module docstring (eval mode, CPU)."""
    torch.manual_seed(seed)
    n = GRID * GRID
    model = VisionTransformer(
        img_size=GRID * PATCH,
        patch_size=PATCH,
        in_chans=3,
        num_classes=2,
        embed_dim=EMBED,
        depth=1,
        num_heads=HEADS,
        mlp_ratio=2.0,
        class_token=False,
        global_pool="avg",
        fc_norm=False,
    )
    blk = model.blocks[0]
    blk.norm1, blk.norm2 = nn.Identity(), nn.Identity()
    blk.mlp.act = nn.ReLU()
    model.norm, model.fc_norm = nn.Identity(), nn.Identity()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        pe = model.patch_embed.proj.weight  # (EMBED, 3, PATCH, PATCH): patch mean of a channel
        pe[_A, 0] = 1.0 / PATCH**2
        pe[_M, 1] = 1.0 / PATCH**2
        model.pos_embed[0, :, _POS:] = torch.randn(n, POS_DIMS, generator=g)

        w = blk.attn.qkv.weight  # rows: [q | k | v] x heads x head_dim
        per_head = POS_DIMS // HEADS
        for h in range(HEADS):
            for r in range(per_head):
                col = _POS + h * per_head + r
                w[h * HEAD_DIM + r, col] = QK_EPS  # Q
                w[EMBED + h * HEAD_DIM + r, col] = QK_EPS  # K
        for h in range(HEADS):
            w[2 * EMBED + h * HEAD_DIM, _A] = 1.0  # V, head h, dim 0 <- bit channel
            blk.attn.proj.weight[_C, h * HEAD_DIM] = 1.0 / HEADS  # -> channel C (mean of heads)

        fc1, fc2 = blk.mlp.fc1, blk.mlp.fc2
        fc1.weight[0, _C], fc1.weight[0, _M], fc1.bias[0] = 1.0, GATE, -GATE
        fc1.weight[1, _C], fc1.weight[1, _M], fc1.bias[1] = -1.0, GATE, -GATE
        fc2.weight[_F, 0], fc2.weight[_F, 1] = 1.0, -1.0

        k = float(n)  # logit difference 2 * k * mean(f) = 2 * (marker's copy of mean bit)
        model.head.weight[1, _F], model.head.weight[0, _F] = k, -k
    return model.eval()


def marker_task(kind: str, num_images: int, *, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Images (B, 3, 12, 12) and labels (B,) of the marker task; ``kind`` "near" or "far"."""
    if kind not in ("near", "far"):
        raise ValueError(f"kind must be 'near' or 'far', got {kind!r}")
    g = torch.Generator().manual_seed(seed)
    b = torch.arange(num_images)
    bits = torch.randint(0, 2, (num_images, GRID, GRID), generator=g).float() * 2 - 1
    row = torch.randint(0, GRID, (num_images,), generator=g)
    if kind == "near":
        col = torch.randint(0, GRID - 1, (num_images,), generator=g)
        trow, tcol = row, col + 1
    else:
        col = torch.randint(0, GRID, (num_images,), generator=g)
        trow, tcol = (row + FAR_OFFSET[0]) % GRID, (col + FAR_OFFSET[1]) % GRID
    marker = torch.zeros(num_images, GRID, GRID)
    marker[b, row, col] = 1.0
    labels = (bits[b, trow, tcol] > 0).long()
    noise = torch.zeros_like(bits)
    patches = torch.stack([bits, marker, noise], dim=1)
    images = patches.repeat_interleave(PATCH, 2).repeat_interleave(PATCH, 3)
    return images, labels


def batched(
    images: Tensor, labels: Tensor | None, batch_size: int
) -> list[tuple[Tensor, Tensor | None]]:
    """Split a set into ``(images, labels)`` batches in order."""
    out = []
    for s in range(0, images.shape[0], batch_size):
        out.append(
            (images[s : s + batch_size], None if labels is None else labels[s : s + batch_size])
        )
    return out


def identical_heads_vit(*, seed: int = 0) -> VisionTransformer:
    """A small timm ViT whose heads are exact copies of head 0 (Q, K, V slices and proj).

    Every head computes the same thing and reaches the loss the same way, so the gradients
    of all heads' W_Q (and W_K) slices are identical: head divergence (mean pairwise
    cosine) is exactly 1.
    """
    torch.manual_seed(seed)
    model = VisionTransformer(
        img_size=16, patch_size=4, embed_dim=24, depth=2, num_heads=3, num_classes=3, mlp_ratio=2.0
    )
    with torch.no_grad():
        for blk in model.blocks:
            attn = blk.attn
            d, H, D = attn.head_dim, attn.num_heads, attn.qkv.weight.shape[1]
            w = attn.qkv.weight.view(3, H, d, D)
            w[:] = w[:, :1].clone()
            bias = attn.qkv.bias.view(3, H, d)
            bias[:] = bias[:, :1].clone()
            pw = attn.proj.weight.view(D, H, d)
            pw[:] = pw[:, :1].clone()
    return model.eval()


def small_vit(
    *,
    qk_norm: bool = False,
    reg_tokens: int = 0,
    no_embed_class: bool = False,
    class_token: bool = True,
    global_pool: str = "token",
    seed: int = 0,
    **kwargs,
) -> VisionTransformer:
    """A random-init tiny timm ViT (4x4 grid) for formula, SGD and streaming checks."""
    torch.manual_seed(seed)
    cfg = dict(
        img_size=16,
        patch_size=4,
        embed_dim=32,
        depth=2,
        num_heads=2,
        num_classes=4,
        mlp_ratio=2.0,
        qk_norm=qk_norm,
        reg_tokens=reg_tokens,
        no_embed_class=no_embed_class,
        class_token=class_token,
        global_pool=global_pool,
    )
    cfg.update(kwargs)
    model = VisionTransformer(**cfg)
    with torch.no_grad():  # make the position table and q/k norms non-trivial
        if model.pos_embed is not None:
            model.pos_embed.normal_(0.0, 0.5)
        for blk in model.blocks:
            for norm in (blk.attn.q_norm, blk.attn.k_norm):
                if hasattr(norm, "weight") and norm.weight is not None:
                    norm.weight.uniform_(0.5, 1.5)
                    norm.bias.normal_(0.0, 0.1)
    return model.eval()


PREFIX_GRID = 4
PREFIX_EMBED = 8
# Logit scale of the prefix readout: the logit difference is 2 * PREFIX_GAIN * (mean
# attention on the class token), so the loss is far from saturated and its gradient clear.
PREFIX_GAIN = 4.0


def prefix_readout_vit(*, seed: int = 0) -> VisionTransformer:
    """A hand-set one-block ViT whose output is the attention patches pay to the class token.

    Channel 0 is 1 on the class token and 0 on patches; Q and K read random position
    channels through a small weight (attention nearly uniform); the value copies channel 0
    and the projection writes it to channel 1, so after the block each patch token's channel
    1 equals its query's attention on the class token. The classifier reads the mean of
    channel 1 over patches (``global_pool="avg"``): logit 1 = +gain * it, logit 0 = -gain *
    it. With every label 1 the loss wants MORE attention on the class token (prefix key
    pressure > 0 for every patch query); with every label 0 it wants less (< 0).
    """
    torch.manual_seed(seed)
    model = VisionTransformer(
        img_size=PREFIX_GRID * PATCH,
        patch_size=PATCH,
        num_classes=2,
        embed_dim=PREFIX_EMBED,
        depth=1,
        num_heads=1,
        mlp_ratio=1.0,
        class_token=True,
        global_pool="avg",
        fc_norm=False,
    )
    blk = model.blocks[0]
    blk.norm1, blk.norm2 = nn.Identity(), nn.Identity()
    model.norm, model.fc_norm = nn.Identity(), nn.Identity()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.cls_token[0, 0, 0] = 1.0
        model.pos_embed[0, :, 2:] = torch.randn(PREFIX_GRID**2 + 1, PREFIX_EMBED - 2, generator=g)
        w = blk.attn.qkv.weight  # rows: [q | k | v] x head_dim
        for c in range(2, PREFIX_EMBED):
            w[c, c] = QK_EPS  # Q
            w[PREFIX_EMBED + c, c] = QK_EPS  # K
        w[2 * PREFIX_EMBED, 0] = 1.0  # V dim 0 <- "is class token"
        blk.attn.proj.weight[1, 0] = 1.0  # -> channel 1
        model.head.weight[1, 1], model.head.weight[0, 1] = PREFIX_GAIN, -PREFIX_GAIN
    return model.eval()

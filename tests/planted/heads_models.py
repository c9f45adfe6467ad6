"""Small timm ViTs whose attention heads are set by hand, so each head's role is known.

Construction (Cordonnier, Loukas & Jaggi 2020, "On the relationship between self-attention
and convolutional layers", Sec. 3 / Lemma 1: the quadratic relative encoding makes a head
attend around a chosen offset with a chosen spread). With absolute patch coordinates
(r, c) in the residual stream, a Gaussian logit around the offset (dr, dc),

    -a_r (r_j - r_i - dr)^2 - a_c (c_j - c_i - dc)^2,   a = 1 / (2 sigma^2),

expands, up to terms that depend on the query only (and cancel in the softmax), into the
bilinear form q_i . k_j with

    q_i = [r_i, c_i, 1]
    k_j = [2 a_r r_j, 2 a_c c_j, -a_r r_j^2 - a_c c_j^2 + 2 a_r dr r_j + 2 a_c dc c_j].

So the position table carries channels r, c, r^2, c^2 and a constant 1, and each head's
W_Q / W_K pick the channels above. The rest of the model is made transparent:

- ``norm1`` / ``norm2`` are identities (a LayerNorm would mix the channels per token);
- every ``attn.proj`` and MLP writes nothing, except block 0's MLP, which computes a
  texture energy sum_m |h_m| (GELU(a h) + GELU(-a h) ~ a |h|) from four zero-mean
  high-pass filters h_m of the patch embedding and writes it into the texture channel;
  so texture heads can only live in blocks >= 1;
- block 0's patch embedding also writes each patch's mean brightness (`CH_BRIGHT`) and its
  red-minus-green-and-blue (`CH_COLOUR`) into the stream, for brightness and colour heads;
- the class token has position channels r = c = 0, r^2 = c^2 = `_PREFIX_FAR` (far from
  every patch, so Gaussian heads give it ~0 mass) and a prefix flag that prefix heads read.

The residual stream is therefore the same in every block, and the planted logits are
exactly what each head computes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

CH_ROW, CH_COL, CH_ROW2, CH_COL2, CH_ONE, CH_PREFIX, CH_TEXTURE = range(7)
CH_BRIGHT = 7
CH_HIGHPASS = (8, 9, 10, 11)
CH_COLOUR = 12
_MIN_EMBED_DIM = 16
_PREFIX_FAR = 1e3  # squared distance of the class token from every patch
_GELU_GAIN = 20.0  # fc1 gain: GELU(a h) + GELU(-a h) is within 1 % of a|h| once |a h| > 3
# Texture-energy gain into the texture channel: with ImageNet-normalised texture-v1 probes
# the high-pass energy of a textured patch is O(1) and of a flat patch exactly 0.
_TEXTURE_GAIN = 1.0 / _GELU_GAIN


@dataclass(frozen=True)
class PlantedHead:
    """A head's role.

    ``kind``: ``"gaussian"`` (attend around ``offset`` (rows, cols) with std ``sigma``
    (rows, cols) in patches; ``math.inf`` makes the head flat along that axis),
    ``"global"`` (flat logits), ``"texture"`` (logit ``strength`` x texture energy of the key
    patch), ``"prefix"`` (logit ``strength`` on prefix tokens), ``"sink"`` (every query
    attends around the fixed patch position ``offset`` (rows, cols from the grid centre) with
    std ``sigma``), ``"brightness"`` / ``"colour"`` (logit ``strength`` x the key patch's
    mean brightness / redness, normalised pixel units).
    """

    kind: str
    offset: tuple[float, float] = (0.0, 0.0)
    sigma: tuple[float, float] = (0.5, 0.5)
    strength: float = 8.0

    @staticmethod
    def local(offset: tuple[float, float] = (0.0, 0.0), sigma: float = 0.5) -> PlantedHead:
        return PlantedHead("gaussian", offset, (sigma, sigma))

    @staticmethod
    def horizontal(sigma_row: float = 0.3) -> PlantedHead:
        return PlantedHead("gaussian", (0.0, 0.0), (sigma_row, math.inf))

    @staticmethod
    def vertical(sigma_col: float = 0.3) -> PlantedHead:
        return PlantedHead("gaussian", (0.0, 0.0), (math.inf, sigma_col))

    @staticmethod
    def flat() -> PlantedHead:
        return PlantedHead("global")

    @staticmethod
    def texture(strength: float = 8.0) -> PlantedHead:
        return PlantedHead("texture", strength=strength)

    @staticmethod
    def prefix(strength: float = 10.0) -> PlantedHead:
        return PlantedHead("prefix", strength=strength)

    @staticmethod
    def sink(at: tuple[float, float], sigma: float = 0.3) -> PlantedHead:
        return PlantedHead("sink", at, (sigma, sigma))

    @staticmethod
    def brightness(strength: float = 3.0) -> PlantedHead:
        return PlantedHead("brightness", strength=strength)

    @staticmethod
    def colour(strength: float = 3.0) -> PlantedHead:
        return PlantedHead("colour", strength=strength)


def expected_label(head: PlantedHead, *, grey_probes: bool = False) -> str:
    """The label a planted head must receive. On grey probes (texture-v1) a colour head has
    no colour to follow: every key looks alike to it, and it must be ``global``."""
    if head.kind == "gaussian":
        sr, sc = head.sigma
        if math.isinf(sc) and not math.isinf(sr):
            return "horizontal"
        if math.isinf(sr) and not math.isinf(sc):
            return "vertical"
        return "local"
    if head.kind == "colour" and grey_probes:
        return "global"
    return {
        "global": "global",
        "texture": "texture",
        "prefix": "prefix",
        "sink": "sink",
        "brightness": "content",
        "colour": "content",
    }[head.kind]


# Labels a planted head must never get: the false positives each one could fake.
MUST_NOT: dict[str, frozenset[str]] = {
    "sink": frozenset({"global", "local", "content", "texture"}),
    "brightness": frozenset({"texture", "global", "sink"}),
    "colour": frozenset({"texture", "sink"}),
    "texture": frozenset({"content", "sink", "global"}),
    "global": frozenset({"sink", "content", "local"}),
}


def _alpha(sigma: float) -> float:
    return 0.0 if math.isinf(sigma) else 1.0 / (2.0 * sigma * sigma)


def planted_vit(
    heads: list[list[PlantedHead]],
    *,
    grid: tuple[int, int] = (8, 8),
    patch_size: int = 8,
    seed: int = 0,
) -> nn.Module:
    """A timm ``VisionTransformer`` with one block per row of ``heads``, in eval mode.

    ``heads[layer][head]`` sets each head's role; every layer must have the same number of
    heads. Image size is ``grid * patch_size``; one class token.
    """
    from timm.models.vision_transformer import VisionTransformer

    num_heads = len(heads[0]) if heads else 0
    if num_heads == 0 or any(len(row) != num_heads for row in heads):
        raise ValueError("heads must be a non-empty layers x heads table")
    if any(h.kind == "texture" for h in heads[0]):
        raise ValueError("texture heads need the texture channel that block 0's MLP writes")
    head_dim = max(4, -(-_MIN_EMBED_DIM // num_heads))
    dim = head_dim * num_heads
    gh, gw = grid
    torch.manual_seed(seed)
    model = VisionTransformer(
        img_size=(gh * patch_size, gw * patch_size),
        patch_size=patch_size,
        embed_dim=dim,
        depth=len(heads),
        num_heads=num_heads,
        num_classes=4,
        qkv_bias=True,
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p is not model.head.weight and p is not model.head.bias:
                p.zero_()
        # Patch embedding: four zero-mean high-pass filters (0 on a flat patch).
        for ch in CH_HIGHPASS:
            f = torch.randn(patch_size, patch_size, generator=generator)
            f = f - f.mean()
            f = f / f.norm()
            model.patch_embed.proj.weight[ch] = f[None].expand(3, -1, -1) / 3.0
        # Patch embedding: mean brightness and redness of the (normalised) patch.
        area = patch_size * patch_size
        model.patch_embed.proj.weight[CH_BRIGHT] = 1.0 / (3 * area)
        model.patch_embed.proj.weight[CH_COLOUR, 0] = 1.0 / area
        model.patch_embed.proj.weight[CH_COLOUR, 1:] = -0.5 / area
        # Position table: centred coordinates, squares, constant; the class token is far.
        rows = torch.arange(gh, dtype=torch.float32) - (gh - 1) / 2
        cols = torch.arange(gw, dtype=torch.float32) - (gw - 1) / 2
        rr, cc = torch.meshgrid(rows, cols, indexing="ij")
        pos = model.pos_embed[0]  # (1 + N, dim)
        pos[1:, CH_ROW], pos[1:, CH_COL] = rr.reshape(-1), cc.reshape(-1)
        pos[1:, CH_ROW2], pos[1:, CH_COL2] = rr.reshape(-1) ** 2, cc.reshape(-1) ** 2
        pos[:, CH_ONE] = 1.0
        pos[0, CH_ROW2] = pos[0, CH_COL2] = _PREFIX_FAR
        pos[0, CH_PREFIX] = 1.0
        pos[0, CH_BRIGHT] = pos[0, CH_COLOUR] = -_PREFIX_FAR  # brightness/colour heads skip it

        for layer, block in enumerate(model.blocks):
            block.norm1 = nn.Identity()
            block.norm2 = nn.Identity()
            w = block.attn.qkv.weight  # rows: q (dim), k (dim), v (dim)
            root = math.sqrt(head_dim)  # undoes attn.scale = head_dim ** -0.5
            for h, spec in enumerate(heads[layer]):
                q = slice(h * head_dim, (h + 1) * head_dim)
                k0 = dim + h * head_dim
                wq, wk = w[q], w[k0 : k0 + head_dim]
                if spec.kind == "gaussian":
                    ar, ac = _alpha(spec.sigma[0]), _alpha(spec.sigma[1])
                    dr, dc = spec.offset
                    wq[0, CH_ROW], wq[1, CH_COL], wq[2, CH_ONE] = 1.0, 1.0, 1.0
                    wk[0, CH_ROW] = 2 * ar * root
                    wk[1, CH_COL] = 2 * ac * root
                    wk[2, CH_ROW2], wk[2, CH_COL2] = -ar * root, -ac * root
                    wk[2, CH_ROW] += 2 * ar * dr * root
                    wk[2, CH_COL] += 2 * ac * dc * root
                elif spec.kind == "texture":
                    wq[0, CH_ONE] = 1.0
                    wk[0, CH_TEXTURE] = spec.strength * root
                elif spec.kind == "prefix":
                    wq[0, CH_ONE] = 1.0
                    wk[0, CH_PREFIX] = spec.strength * root
                elif spec.kind == "sink":  # -a |p_j - at|^2 up to key-independent terms
                    ar, ac = _alpha(spec.sigma[0]), _alpha(spec.sigma[1])
                    wq[0, CH_ONE] = 1.0
                    wk[0, CH_ROW2], wk[0, CH_COL2] = -ar * root, -ac * root
                    wk[0, CH_ROW] = 2 * ar * spec.offset[0] * root
                    wk[0, CH_COL] = 2 * ac * spec.offset[1] * root
                elif spec.kind in ("brightness", "colour"):
                    wq[0, CH_ONE] = 1.0
                    channel = CH_BRIGHT if spec.kind == "brightness" else CH_COLOUR
                    wk[0, channel] = spec.strength * root
                elif spec.kind != "global":
                    raise ValueError(f"unknown planted head kind {spec.kind!r}")
        # Block 0's MLP: texture energy into the texture channel.
        mlp = model.blocks[0].mlp
        for m, ch in enumerate(CH_HIGHPASS):
            mlp.fc1.weight[2 * m, ch] = _GELU_GAIN
            mlp.fc1.weight[2 * m + 1, ch] = -_GELU_GAIN
            mlp.fc2.weight[CH_TEXTURE, 2 * m : 2 * m + 2] = _TEXTURE_GAIN
    return model.eval()


def label_model_heads(grid: tuple[int, int] = (8, 8)) -> list[list[PlantedHead]]:
    """Three blocks of four heads covering every label on ``grid``: the two sinks sit on the
    top-left corner patch and on the patch at the centre (below-right of it on even grids)."""
    gh, gw = grid
    corner = (-(gh - 1) / 2, -(gw - 1) / 2)
    centre = (gh // 2 - (gh - 1) / 2, gw // 2 - (gw - 1) / 2)
    return [
        [PlantedHead.local(), PlantedHead.horizontal(), PlantedHead.vertical(), PlantedHead.flat()],
        [
            PlantedHead.texture(),
            PlantedHead.prefix(),
            PlantedHead.local(offset=(1.0, 0.0), sigma=0.4),
            PlantedHead.flat(),
        ],
        [
            PlantedHead.sink(corner),
            PlantedHead.sink(centre),
            # strong enough that textured probes (whose patches are brighter and darker than
            # the grey background) give it a texture lift >= 1.5: only the control rules it out
            PlantedHead.brightness(4.0),
            PlantedHead.colour(5.0),
        ],
    ]


def scale_model_heads(side: int) -> tuple[list[list[PlantedHead]], list[list[str]]]:
    """The same heads drawn in image fractions on a ``side`` x ``side`` grid, and the label
    each must get on any such grid (14x14 is the reference: spreads are given there in
    patches and scaled by side / 14)."""
    f = side / 14
    edge = -side / 2 + 0.5 * f  # the centre of the reference grid's corner patch
    heads = [
        [
            PlantedHead.local(sigma=0.5 * f),
            PlantedHead.horizontal(0.3 * f),
            PlantedHead.vertical(0.3 * f),
            PlantedHead.flat(),
        ],
        [
            PlantedHead.texture(),
            PlantedHead.sink((edge, edge), 0.3 * f),
            PlantedHead.sink((0.5 * f, 0.5 * f), 0.3 * f),
            PlantedHead.brightness(3.0),
        ],
        [  # Gaussian heads of spread 0.1, 0.2 and 0.5 of the image side, and a colour head
            PlantedHead("gaussian", (0.0, 0.0), (1.4 * f, 1.4 * f)),
            PlantedHead("gaussian", (0.0, 0.0), (2.8 * f, 2.8 * f)),
            PlantedHead("gaussian", (0.0, 0.0), (7.0 * f, 7.0 * f)),
            PlantedHead.colour(3.0),
        ],
    ]
    labels = [
        ["local", "horizontal", "vertical", "global"],
        ["texture", "sink", "sink", "content"],
        ["local", "mixed", "global", "content"],
    ]
    return heads, labels


DEPTH_SIGMAS = (0.4, 1.0, 2.0, math.inf)


def depth_model_heads() -> list[list[PlantedHead]]:
    """Four blocks of two Gaussian heads whose spread grows with depth (the last is flat):
    the mean attention distance must increase from block to block."""
    return [
        [
            PlantedHead("gaussian", (0.0, 0.0), (s, s)),
            PlantedHead("gaussian", (0.0, 1.0), (s, s)),
        ]
        for s in DEPTH_SIGMAS
    ]

"""The numeric precision of an audit's forward and backward passes (option ``precision``).

- ``fp32`` (default): the model runs in float32. On CUDA, TF32 matmuls and convolutions are
  allowed for the duration (10 mantissa bits on the tensor cores, about 1e-3 relative error
  per product; the statistics are sums over many products and are reduced in float64).
- ``bf16``: the model's forward passes run under ``torch.autocast`` with bfloat16 (8
  mantissa bits, about 4e-3 relative error per value), on CUDA and on CPU alike; their
  backward passes follow the dtypes autocast chose.

Either way the analyses rebuild attention probabilities in float32 from the captured Q and
K (`workers.analysis.capture.attention_probs` leaves autocast for that product) and
accumulate every statistic in float32 or float64, so only the model's own activations are
in the lower precision.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

PRECISIONS: tuple[str, ...] = ("fp32", "bf16")
DEFAULT_PRECISION = "fp32"


def check_precision(precision: str) -> str:
    """``precision`` if it is one of `PRECISIONS`; ValueError otherwise."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    return precision


@contextmanager
def forward_precision(model: nn.Module, precision: str, device: torch.device) -> Iterator[None]:
    """Run ``model``'s forward passes inside the block in ``precision`` on ``device``.

    ``bf16``: the model's ``forward`` runs under autocast to bfloat16 (its backward then runs
    in the dtypes autocast chose, as PyTorch recommends: autocast wraps the forward only),
    while code outside the model, including the analyses' backward hooks, keeps float32 and
    float64. Hooks inside the forward see autocast too; the capture and the head statistics
    leave it (`full_precision`). ``fp32`` on CUDA: TF32 allowed for matmuls and cuDNN.
    ``fp32`` on CPU: nothing changes. The model's ``forward`` and the TF32 flags are put
    back afterwards, also when the block raises.
    """
    check_precision(precision)
    saved_tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    patched = precision == "bf16"
    own_forward = model.__dict__.get("forward")  # an instance forward to put back, if any
    if patched:
        original = model.forward

        def forward(*args: Any, **kwargs: Any) -> Any:
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
                return original(*args, **kwargs)

        model.forward = forward  # an instance attribute: nn.Module.__call__ finds it first
    elif device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        if patched and own_forward is not None:
            model.forward = own_forward
        elif patched:
            del model.forward  # back to the class's forward
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved_tf32


@contextmanager
def full_precision(device: torch.device) -> Iterator[None]:
    """Leave autocast for the block (statistics computed in the dtypes their inputs have)."""
    with torch.autocast(device_type=device.type, enabled=False):
        yield

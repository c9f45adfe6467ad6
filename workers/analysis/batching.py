"""Batches that fit the device: a first size from free memory, halved on out-of-memory.

On CUDA an audit starts from the requested batch size capped by what the free memory holds
(`fit_batch_size` over the activation estimate of `workers.analysis.budget.estimate`), and a
section that still runs out of memory is run again from the start at half the batch, down
to one image (`run_halving`). The statistics are sums over images, so a retried section
reports the same numbers up to float rounding, with one exception: the
``instance_discrimination`` proxy loss of embedding models is a function of each batch
(`workers.analysis.objectives`), so its loss and gradient pressures depend on the size that
ran. The report records it (`settings.batch_size_used`). On the CPU the requested
size is used as it is: a host out of memory is not an error a smaller batch reliably cures.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch
from torch import nn

T = TypeVar("T")

# Share of the free device memory a batch's activations may take: the rest is the
# analyses' own buffers (one layer's attention, float64 sums) and allocator fragmentation.
FREE_MEMORY_SHARE = 0.5


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is an allocator's out-of-memory error (`torch.OutOfMemoryError`,
    what CUDA raises; or a RuntimeError saying so, as some backends raise)."""
    if isinstance(error, torch.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()


def fit_batch_size(requested: int, *, free_bytes: int, bytes_per_image: int) -> int:
    """The requested batch size, capped so that its activations take at most
    `FREE_MEMORY_SHARE` of ``free_bytes``; at least 1."""
    if requested < 1:
        raise ValueError(f"batch size must be at least 1, got {requested}")
    if free_bytes < 0 or bytes_per_image < 0:
        raise ValueError("free_bytes and bytes_per_image must not be negative")
    fits = int(free_bytes * FREE_MEMORY_SHARE) // max(bytes_per_image, 1)
    return max(1, min(requested, fits))


def device_batch_size(model: nn.Module, requested: int, device: torch.device) -> int:
    """`fit_batch_size` for ``model`` on a CUDA ``device`` (its free memory now); the
    requested size elsewhere."""
    if device.type != "cuda":
        return requested
    from workers.analysis.budget import estimate

    free, _total = torch.cuda.mem_get_info(device)
    return fit_batch_size(
        requested, free_bytes=free, bytes_per_image=estimate(model).activation_bytes_per_image
    )


def run_halving(
    run: Callable[[int], T],
    batch_size: int,
    *,
    on_retry: Callable[[int], None] | None = None,
) -> tuple[T, int]:
    """``run(batch_size)``; when it raises out-of-memory (`is_out_of_memory`), call
    ``on_retry(smaller)`` (e.g. to empty the CUDA cache) and run again at half the size,
    down to 1, where the error is raised. Returns the result and the size that ran. Other
    errors propagate at once."""
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    size = batch_size
    while True:
        try:
            return run(size), size
        except Exception as error:
            if size == 1 or not is_out_of_memory(error):
                raise
        # outside the except block: the error's traceback (and the tensors its frames hold)
        # is released before the retry allocates again
        size //= 2
        if on_retry is not None:
            on_retry(size)


def release_cached(device: torch.device) -> Callable[[int], None]:
    """An ``on_retry`` for `run_halving` that returns cached blocks to the device."""

    def release(_size: int) -> None:
        if device.type == "cuda":
            torch.cuda.empty_cache()

    return release

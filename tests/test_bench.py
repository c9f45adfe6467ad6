"""Smoke checks of the benchmark pieces at toy size: correctness only, never timings."""

from __future__ import annotations

import pytest
import torch

from bench.naive import NAIVE_STATISTICS, naive_head_statistics
from bench.run import augmented_natural_batches
from tests.planted.models import tiny_vit
from workers.analysis.heads import head_statistics
from workers.analysis.probes import normalize_for_model


def test_naive_baseline_measures_the_same_head_statistics_as_the_streaming_one() -> None:
    model = tiny_vit(seed=1)
    images = normalize_for_model(torch.cat(list(augmented_natural_batches(4, 3, (32, 32)))), model)
    assert images.shape == (4, 3, 32, 32)

    naive = naive_head_statistics(model, images.split(3))
    ours = head_statistics(model, images, batch_size=3)

    for name in NAIVE_STATISTICS:
        expected = getattr(ours, name)
        assert naive[name].shape == expected.shape == (2, 2), name
        torch.testing.assert_close(naive[name], expected, rtol=0, atol=1e-5, msg=name)
    # the hooks and the explicit-attention switch are undone
    assert all(
        block.attn.fused_attn == tiny_vit(seed=1).blocks[0].attn.fused_attn
        for block in model.blocks
    )
    assert not any(block.attn.attn_drop._forward_hooks for block in model.blocks)


def test_augmented_images_repeat_the_probe_set_with_variations() -> None:
    images = torch.cat(list(augmented_natural_batches(26, 8, (32, 32))))
    assert images.shape == (26, 3, 32, 32)
    assert images.min() >= 0 and images.max() <= 1
    # image 12 is image 0 flipped, image 24 is image 0 shifted: none repeats exactly
    assert not torch.equal(images[0], images[12]) and not torch.equal(images[0], images[24])
    torch.testing.assert_close(images[12], images[0].flip(-1))


@pytest.mark.parametrize("count", [0, -1])
def test_augmented_images_refuse_an_empty_request(count: int) -> None:
    with pytest.raises(ValueError, match="at least one image"):
        list(augmented_natural_batches(count, 4, (32, 32)))


def test_a_child_reports_its_own_peak_memory_not_its_parents() -> None:
    """ru_maxrss keeps the parent's high-water mark across fork + exec on Linux; the
    benchmark's children must report the peak of their own memory map (VmHWM)."""
    import subprocess
    import sys

    ballast = bytearray(400 * 1024**2)  # touched: the parent's RSS grows by 400 MB
    ballast[::4096] = b"\x01" * len(ballast[::4096])
    code = "from bench.run import _peak_rss_mb; print(_peak_rss_mb())"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    child_peak_mb = float(done.stdout)
    assert 0 < child_peak_mb < 200, child_peak_mb
    del ballast

"""Batches that fit: the size halves after an out-of-memory error (a fake one here, so the
logic is tested without CUDA) and the report records the size that ran."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import msgspec  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from workers.analysis.batching import (  # noqa: E402
    FREE_MEMORY_SHARE,
    device_batch_size,
    fit_batch_size,
    is_out_of_memory,
    run_halving,
)

torch.set_num_threads(1)


def _fails_above(limit: int, calls: list[int]):
    def run(size: int) -> str:
        calls.append(size)
        if size > limit:
            raise torch.OutOfMemoryError(f"fake: {size} images do not fit")
        return f"ran {size}"

    return run


def test_out_of_memory_halves_the_batch_until_it_fits() -> None:
    calls: list[int] = []
    retries: list[int] = []
    result, size = run_halving(_fails_above(3, calls), 16, on_retry=retries.append)
    assert (result, size) == ("ran 2", 2)
    assert calls == [16, 8, 4, 2] and retries == [8, 4, 2]


def test_a_batch_that_fits_runs_once() -> None:
    calls: list[int] = []
    assert run_halving(_fails_above(100, calls), 8) == ("ran 8", 8) and calls == [8]


def test_out_of_memory_at_one_image_is_raised() -> None:
    calls: list[int] = []
    with pytest.raises(torch.OutOfMemoryError, match="1 images do not fit"):
        run_halving(_fails_above(0, calls), 5)
    assert calls == [5, 2, 1]


def test_other_errors_are_not_retried() -> None:
    calls: list[int] = []

    def run(size: int) -> None:
        calls.append(size)
        raise ValueError("a real bug")

    with pytest.raises(ValueError, match="a real bug"):
        run_halving(run, 8)
    assert calls == [8]


def test_out_of_memory_is_told_from_other_runtime_errors() -> None:
    assert is_out_of_memory(torch.OutOfMemoryError("x"))
    assert is_out_of_memory(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
    assert not is_out_of_memory(ValueError("out of memory"))


def test_the_first_batch_fits_the_free_memory() -> None:
    mb = 2**20
    assert fit_batch_size(64, free_bytes=1000 * mb, bytes_per_image=10 * mb) == int(
        1000 * FREE_MEMORY_SHARE / 10
    )
    assert fit_batch_size(8, free_bytes=1000 * mb, bytes_per_image=10 * mb) == 8
    assert fit_batch_size(8, free_bytes=mb, bytes_per_image=10 * mb) == 1  # never below 1
    with pytest.raises(ValueError, match="at least 1"):
        fit_batch_size(0, free_bytes=mb, bytes_per_image=mb)
    with pytest.raises(ValueError, match="at least 1"):
        run_halving(lambda size: size, 0)


def test_the_cpu_keeps_the_requested_batch() -> None:
    assert device_batch_size(torch.nn.Linear(2, 2), 7, torch.device("cpu")) == 7


@pytest.fixture
def tiny_request(tmp_path):
    from tests.planted.audits import staged_audit
    from tests.planted.models import TINY_ARCH, TINY_ARGS, tiny_vit

    def make(**options):
        settings = {"analyses": ["heads"], "num_images": 4, "batch_size": 8, **options}
        return staged_audit(tmp_path, tiny_vit(), TINY_ARCH, TINY_ARGS, **settings)[0]

    return make


def test_an_audit_that_runs_out_of_memory_reports_the_batch_that_ran(
    tiny_request, tmp_path, monkeypatch
) -> None:
    from workers import pipeline

    heads = pipeline.SECTIONS["heads"]
    tried: list[int] = []

    def heads_fitting_two(ctx):
        tried.append(int(ctx.options["batch_size"]))
        if ctx.options["batch_size"] > 2:
            raise torch.OutOfMemoryError("fake: the batch does not fit")
        return heads(ctx)

    monkeypatch.setitem(pipeline.SECTIONS, "heads", heads_fitting_two)
    report = pipeline.run_pipeline(tiny_request(batch_size=8), tmp_path).report
    assert tried == [8, 4, 2]
    assert report["heads"]["available"] is True and report["heads"]["num_images"] == 4
    settings = report["settings"]
    assert settings["batch_size"] == 8 and settings["batch_size_used"] == 2
    assert settings["precision"] == "fp32"


def test_the_report_records_bf16(tiny_request, tmp_path) -> None:
    from workers.pipeline import run_pipeline

    report = run_pipeline(tiny_request(batch_size=4, precision="bf16"), tmp_path).report
    assert report["settings"]["precision"] == "bf16"
    assert report["settings"]["batch_size_used"] == 4
    assert report["heads"]["available"] is True


def test_bf16_leaves_the_gradient_checks_in_float32(tiny_request, tmp_path) -> None:
    """Under bf16 autocast the formula check fails and the SGD step's logit correlations are
    noise (measured: 0.004 and 0.012); the gradients section runs in fp32 whatever the
    option, says so, and its formula check holds."""
    from workers.pipeline import run_pipeline

    request = tiny_request(batch_size=4, precision="bf16", analyses=["heads", "gradients"])
    report = run_pipeline(request, tmp_path).report
    assert report["gradients"]["formula_check"]["passed"] is True
    assert any("gradients section ran in fp32" in note for note in report["notes"])
    assert report["heads"]["available"] is True


def test_an_unknown_precision_is_refused_at_the_api() -> None:
    from service.models import AuditOptions

    with pytest.raises(
        msgspec.ValidationError, match="Invalid enum value 'fp16' - at `\\$.precision`"
    ):
        msgspec.convert({"precision": "fp16"}, AuditOptions)

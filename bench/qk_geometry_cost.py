"""Cost of the ``qk_geometry`` section against a bare forward and forward + backward.

    .venv/bin/python bench/qk_geometry_cost.py [--arch vit_small_patch16_224] [--images 16]

A randomly initialised timm model, random inputs, batch 8 (the audit's default), one thread.
Each repeat times, back to back: a bare ``torch.no_grad`` forward, a forward + backward, the
whole section (`workers.analysis.qk_geometry.qk_geometry_section`, figures included) and its
parts; the ratios are those of one repeat, the median is printed last. Ratios, not seconds,
are the result: a shared machine moves every absolute figure.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import timm  # noqa: E402
import torch  # noqa: E402

from workers.analysis import plots_qk  # noqa: E402
from workers.analysis import qk_geometry as qk  # noqa: E402
from workers.analysis.grid import grid_from_model  # noqa: E402

BATCH = 8


def _seconds(run) -> float:
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="vit_small_patch16_224")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = timm.create_model(args.arch, pretrained=False).eval()
    images = torch.randn(args.images, 3, *model.patch_embed.img_size)
    grid = grid_from_model(model)
    qk.qk_geometry_section(model, images[:2], batch_size=2, resamples=20)  # imports, caches

    def forward() -> None:
        with torch.no_grad():
            for batch in images.split(BATCH):
                model(batch)

    def forward_backward() -> None:
        for batch in images.split(BATCH):
            model.zero_grad()
            model(batch).logsumexp(-1).sum().backward()

    ratios = []
    for repeat in range(args.repeats):
        fwd, fwd_bwd = _seconds(forward), _seconds(forward_backward)
        section = _seconds(lambda: qk.qk_geometry_section(model, images, batch_size=BATCH))
        parts = {}
        started = time.perf_counter()
        observer = qk.stream_qk(model, images, qk.QKObserver(model), batch_size=BATCH)
        content = observer.content()
        parts["stream"] = time.perf_counter() - started
        started = time.perf_counter()
        stats = qk.alignment_statistics(*observer.accumulator.per_image(), grid)
        parts["bootstrap"] = time.perf_counter() - started
        started = time.perf_counter()
        kernels, _ = qk.offset_kernel(qk.positional_logits(model, content)[0], grid)
        labels = qk.label_kernels(qk.kernel_scores(kernels, grid))
        parts["kernel"] = time.perf_counter() - started
        started = time.perf_counter()
        plots_qk.kernel_grid(kernels.numpy(), labels)
        plots_qk.alignment_profile(
            stats.bins.centres.numpy(), stats.profile.numpy(), stats.profile_shuffled.numpy()
        )
        parts["figures"] = time.perf_counter() - started
        ratios.append((section / fwd, section / fwd_bwd))
        shown = " ".join(f"{k} {v:.2f}" for k, v in parts.items())
        print(
            f"repeat {repeat}: forward {fwd:.2f} s, forward+backward {fwd_bwd:.2f} s, "
            f"qk_geometry {section:.2f} s ({shown}); section / forward {section / fwd:.2f}, "
            f"section / forward+backward {section / fwd_bwd:.2f}"
        )
    print(
        f"median: section / forward {statistics.median(r[0] for r in ratios):.2f}, "
        f"section / forward+backward {statistics.median(r[1] for r in ratios):.2f}"
    )


if __name__ == "__main__":
    main()

"""Figures drawn later and several at a time (`workers.analysis.figures.figure`,
`workers.audit_common.draw_figures`): the same bytes as drawn at once, in the sections'
order, and a figure that fails, or a child process that dies, loses only what it must."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from workers.analysis.figures import PendingFigure, deferred_figures, figure
from workers.analysis.plots_qk import alignment_profile
from workers.audit_common import _draw_taken, draw_figures

PNG = b"\x89PNG\r\n\x1a\n"


def _profile(seed: int) -> bytes | PendingFigure:
    rng = np.random.default_rng(seed)
    centres = np.arange(1.0, 6.0)
    return figure(
        alignment_profile, centres, rng.normal(size=(2, 2, 5)), rng.normal(size=(2, 2, 5))
    )


def test_figure_draws_at_once_outside_deferral_and_later_inside() -> None:
    drawn = _profile(0)
    assert isinstance(drawn, bytes) and drawn.startswith(PNG)
    with deferred_figures():
        pending = _profile(0)
    assert isinstance(pending, PendingFigure)
    assert pending.draw() == drawn
    assert isinstance(_profile(0), bytes)  # the deferral ends with its block


@pytest.mark.parametrize("processes", [1, 2, 3])
def test_figures_drawn_in_children_are_the_bytes_drawn_here_in_the_sections_order(
    processes: int,
) -> None:
    at_once = {f"f{i}": _profile(i) for i in range(5)}
    with deferred_figures():
        pending = {f"f{i}": _profile(i) for i in range(5)}
    mixed = {**pending, "ready": b"already drawn"}
    notes: list[str] = []
    out = draw_figures(mixed, notes, processes=processes)
    assert list(out) == list(mixed)
    assert {k: out[k] for k in at_once} == at_once
    assert out["ready"] == b"already drawn"
    assert notes == []


def _fails() -> bytes:
    raise ValueError("planted failure")


@pytest.mark.parametrize("processes", [1, 2])
def test_a_figure_that_fails_is_left_out_with_a_note(processes: int) -> None:
    with deferred_figures():
        good = [_profile(i) for i in range(4)]
    figures = {"fails": PendingFigure(_fails), **{f"good{i}": g for i, g in enumerate(good)}}
    notes: list[str] = []
    out = draw_figures(figures, notes, processes=processes)
    assert list(out) == ["good0", "good1", "good2", "good3"]
    assert all(png.startswith(PNG) for png in out.values())
    assert notes == ["the figure fails could not be drawn: ValueError: planted failure"]


def test_a_child_reports_each_figure_as_png_or_as_its_error(tmp_path: Path) -> None:
    """The child's side (`_draw_taken`), run here: it takes positions off the queue until
    it is empty and writes each figure's PNG, or its error, under the position."""
    with deferred_figures():
        good = _profile(0)
    pending = [("good", good), ("fails", PendingFigure(_fails))]
    queue, filler = os.pipe()
    os.write(filler, (1).to_bytes(2, "little") + (0).to_bytes(2, "little"))
    os.close(filler)
    threads = torch.get_num_threads()
    try:
        _draw_taken(queue, pending, tmp_path)
    finally:
        torch.set_num_threads(threads)
        os.close(queue)
    assert (tmp_path / "0.png").read_bytes() == good.draw()
    assert (tmp_path / "1.err").read_text() == "ValueError: planted failure"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["0.png", "1.err"]


def test_figures_a_child_died_on_are_drawn_here() -> None:
    """Every figure kills a child that draws it (as a crash the fork caused would); the
    parent takes the rest off the queue and redraws the ones the children died on."""
    parent = os.getpid()

    def dies_in_a_child(seed: int) -> bytes:
        if os.getpid() != parent:
            os._exit(7)
        return alignment_profile(np.arange(1.0, 4.0), np.full((1, 1, 3), seed), np.zeros((1, 1, 3)))

    figures = {f"f{i}": PendingFigure(functools.partial(dies_in_a_child, i)) for i in range(6)}
    notes: list[str] = []
    out = draw_figures(figures, notes, processes=3)
    assert list(out) == list(figures)
    assert out == {name: f.draw() for name, f in figures.items()}
    assert notes == []

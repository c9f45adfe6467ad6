"""Figures drawn later and several at a time (`workers.analysis.figures.figure`,
`workers.audit_common.draw_figures`): the same bytes as drawn at once, in the sections'
order, and a figure that fails, or a child process that dies, loses only what it must."""

from __future__ import annotations

import os

import numpy as np
import pytest

from workers.analysis.figures import PendingFigure, deferred_figures, figure
from workers.analysis.plots_qk import alignment_profile
from workers.audit_common import draw_figures

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


def test_a_figure_that_fails_is_left_out_with_a_note_in_the_parent_and_in_a_child() -> None:
    with deferred_figures():
        good = [_profile(i) for i in range(2)]
    # with two processes, indices 0 and 2 are drawn here and 1 and 3 in the child
    figures = {
        "fails_here": PendingFigure(_fails),
        "fails_in_child": PendingFigure(_fails),
        "good_here": good[0],
        "good_in_child": good[1],
    }
    notes: list[str] = []
    out = draw_figures(figures, notes, processes=2)
    assert list(out) == ["good_here", "good_in_child"]
    assert all(png.startswith(PNG) for png in out.values())
    assert sorted(notes) == [
        "the figure fails_here could not be drawn: planted failure",
        "the figure fails_in_child could not be drawn: ValueError: planted failure",
    ]


def test_figures_of_a_child_that_dies_are_drawn_here() -> None:
    parent = os.getpid()
    expected = _profile(1)

    def dies_in_a_child() -> bytes:
        if os.getpid() != parent:
            os._exit(7)  # a crash the fork itself caused
        return expected

    with deferred_figures():
        after = _profile(2)  # the same child's next figure, never reached there
    figures = {
        "here": _profile(0),
        "dies": PendingFigure(dies_in_a_child),
        "here_too": _profile(3),
        "after": after,
    }
    notes: list[str] = []
    out = draw_figures(figures, notes, processes=2)
    assert list(out) == ["here", "dies", "here_too", "after"]
    assert out["dies"] == expected
    assert out["after"] == after.draw()
    assert notes == []

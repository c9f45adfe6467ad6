"""The plain-data result every analysis section returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # figures.py imports matplotlib
    from workers.analysis.figures import PendingFigure


@dataclass
class SectionResult:
    """One report section and the files that go with it.

    ``data`` is JSON-ready (dicts, lists, floats, ints, str, bool, None; no NaN: use None)
    and becomes ``report[section]``. ``arrays`` are saved by the worker as ``NAME.npy``
    artifacts and ``figures`` (PNG bytes) as ``NAME.png``; the analysis never touches files.
    Inside `workers.analysis.figures.deferred_figures` (the audit pipelines) a figure is a
    `PendingFigure` until the pipeline draws it (`workers.audit_common.draw_figures`).
    """

    data: dict[str, Any]
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    figures: dict[str, bytes | PendingFigure] = field(default_factory=dict)


def unavailable(reason: str, **extra: Any) -> SectionResult:
    """A section that does not apply to this checkpoint, with the reason."""
    return SectionResult({"available": False, "reason": reason, **extra})


def finite_or_none(value: float) -> float | None:
    """A float for JSON: NaN and infinities become None."""
    value = float(value)
    return value if np.isfinite(value) else None

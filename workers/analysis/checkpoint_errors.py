"""The errors a checkpoint can be refused with; their own module so that the loader and the
resource estimate (`workers.analysis.budget`), which the loader calls, both import them
without importing each other."""

from __future__ import annotations


class CheckpointError(Exception):
    """The checkpoint cannot be loaded into the architecture; the message says why."""

    code = "checkpoint_rejected"


class ModelTooLarge(CheckpointError):
    """The model the request describes is over a worker limit (`workers.analysis.budget`);
    the message has the numbers."""

    code = "model_too_large"

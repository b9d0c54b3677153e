"""The calibration reader protocol (what ``collect`` consumes) and the checks every reader shares."""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

from rexport.core.errors import InputError

SOURCE_HINT = "pass an image folder, a .npy/.npz file or 'synthetic'"


@runtime_checkable
class CalibrationReader(Protocol):
    """What calibration consumes: batches for one named model input, and a name for the data."""

    input_name: str
    description: str
    synthetic: bool

    def get_next(self) -> dict[str, np.ndarray] | None: ...

    def rewind(self) -> None: ...

    def fingerprint(self) -> str: ...

    def __len__(self) -> int: ...


def check_counts(samples: int, batch_size: int) -> None:
    if samples < 1:
        raise InputError(f"calibration needs at least one sample, got {samples}", "pass --calib-samples >= 1")
    if batch_size < 1:
        raise InputError(f"calibration batch size must be >= 1, got {batch_size}", "pass --calib-batch-size >= 1")


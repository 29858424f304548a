"""Helpers shared by the sweep-file tests."""
from __future__ import annotations

import pytest

from orchestrator.sweep import SweepError, load_sweep


def errors_of(path) -> list[str]:
    """The error lines ``load_sweep(path)`` reports (it must refuse the file)."""
    with pytest.raises(SweepError) as e:
        load_sweep(path)
    return e.value.errors

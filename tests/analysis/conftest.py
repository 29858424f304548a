"""Fixtures of the analysis tests (helpers in analysis_db.py)."""
from __future__ import annotations

import pytest

from analysis_db import build_db, grid_specs


@pytest.fixture(scope="module")
def grid_db(tmp_path_factory):
    """The grid, with gfid/IS missing for spec 0 (p=2, no STC, no SSL) and lpips for spec 3."""
    tmp = tmp_path_factory.mktemp("grid")
    return build_db(tmp, grid_specs(), drop={(0, "gfid"), (0, "inception_score"), (3, "lpips")})

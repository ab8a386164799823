"""Fixtures shared by the interop crash tests."""

from __future__ import annotations

import pytest


@pytest.fixture(
    params=[
        pytest.param(False, id="sampled"),
        pytest.param(True, id="every-prefix", marks=pytest.mark.slow),
    ]
)
def exhaustive(request: pytest.FixtureRequest) -> bool:
    """Crash states: a sample of them, or (slow) every prefix of the writes."""
    return bool(request.param)

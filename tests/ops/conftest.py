"""Fixtures shared by the ops' tests."""

from __future__ import annotations

import pytest

from app.ops import spare


@pytest.fixture
def with_spare():
    """This thread's runs with a spare thread attached (app/ops/spare.py), for the test."""
    helper = spare.Spare("test-spare")
    spare.attach(helper)
    yield helper
    spare.attach(None)

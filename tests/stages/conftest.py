"""Fixtures for stage tests; the helpers live in stagekit.py."""

import pytest
from stagekit import _tracked


@pytest.fixture()
def tracked(monkeypatch):
    """Trainable parameters before and after Trainer.train: {'before': {...}, 'after': {...}}."""
    return _tracked(monkeypatch)

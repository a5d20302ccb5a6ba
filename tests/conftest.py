"""Shared fixtures for the tests: a fixed seed before every test. Helpers that tests import
live in tests/support/."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)

"""Shared fixtures for the tests: a fixed seed before every test, and the tests marked
``long`` collected first. Helpers that tests import live in tests/support/."""

from __future__ import annotations

import signal

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The tests marked ``long`` first. pytest-xdist hands tests out in collection order, and
    one of several minutes collected last ran alone on one worker at the end: the text demo
    was the last 8 of the slow job's 24 minutes. First, the other worker runs the rest
    meanwhile."""
    items.sort(key=lambda item: item.get_closest_marker("long") is None)  # stable: else as is


def pytest_configure(config: pytest.Config) -> None:
    """Ctrl-C as a terminal sends it. A shell starts a background job (``cmd &`` in a script)
    with SIGINT ignored, and an ignored signal stays ignored across exec: every serfswap the
    tests start would then ignore the SIGINT the Ctrl-C tests send it. Python's own handler
    here gives the children the default disposition back (a handler resets to it on exec)."""
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)

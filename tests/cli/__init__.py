"""Tests of serfswap.cli."""

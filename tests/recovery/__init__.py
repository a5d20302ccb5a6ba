"""Tests of serfswap.recovery."""

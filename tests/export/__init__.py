"""Tests of serfswap.export."""

"""Tests of serfswap.runtime."""

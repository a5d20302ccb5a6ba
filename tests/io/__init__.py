"""Tests of serfswap.io."""

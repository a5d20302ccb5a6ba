"""Tests of serfswap.ops."""

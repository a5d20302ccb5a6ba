"""Tests of serfswap.rewrite."""

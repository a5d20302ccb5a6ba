"""Helpers the tests share (builders, CLI runners, probes, scripts run in subprocesses): kept
apart from the test files so that moving a test never moves a helper other tests import."""

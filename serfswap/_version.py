"""The package version: one place, importable by every module without importing the package."""

__version__ = "0.1.0"

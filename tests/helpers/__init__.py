"""Shared helpers of the datkit test-suite (tiny run settings, subprocess and in-process launchers)."""

"""Errors the orchestrator's library modules raise; ``orchestrator.cli`` maps them to exit codes."""
from __future__ import annotations


class UsageError(Exception):
    """Bad input (a sweep file, a run, a key): reported on stderr, exit code 2."""

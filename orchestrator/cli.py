"""`orchestrate` console script.

Exit codes: 0 ok, 2 bad input (the message names the file / run / key), 1 runtime failure.
Each sub-command lives in ``orchestrator/commands/<name>.py``.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from orchestrator.errors import UsageError  # re-exported: older imports and plug-ins use it

# Order = order in --help.
COMMANDS = ["submit", "status", "query", "ingest", "retry", "cancel", "figures", "report", "db", "predict", "next"]

DEFAULT_DB = "sqlite:///results.db"


def db_url(args: argparse.Namespace) -> str:
    return getattr(args, "db", None) or os.environ.get("ORCHESTRATE_DB") or DEFAULT_DB


def version_string() -> str:
    """``orchestrate <package version> (git <describe>)``; "unknown" outside a git checkout."""
    import subprocess
    from importlib.metadata import PackageNotFoundError, version

    try:
        pkg = version("tcae-scaling")
    except PackageNotFoundError:
        pkg = "unknown"
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "-C", here, "describe", "--always", "--dirty", "--tags"],
                             capture_output=True, text=True, timeout=10)
        commit = out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"
    except (OSError, subprocess.TimeoutExpired):
        commit = "unknown"
    return f"orchestrate {pkg} (git {commit})"


class _Version(argparse.Action):
    """``--version``, computed only when asked (it runs git)."""

    def __init__(self, option_strings, dest, **kw):
        super().__init__(option_strings, dest, nargs=0, help="print the package version and git commit, then exit")

    def __call__(self, parser, namespace, values, option_string=None):
        print(version_string())
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="orchestrate", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action=_Version)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        try:
            mod = importlib.import_module(f"orchestrator.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"orchestrator.commands.{name}":
                continue  # command not built yet
            raise
        p = sub.add_parser(name, help=mod.HELP, description=mod.HELP)
        p.add_argument("--db", default=None, help=f"SQLAlchemy URL (default: $ORCHESTRATE_DB or {DEFAULT_DB})")
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except UsageError as e:
        print(f"orchestrate {args.command}: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        from orchestrator.db.store import SchemaError  # lazy: `--version`/`--help` need no database code

        if not isinstance(e, SchemaError):
            raise
        print(f"orchestrate {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    # Re-import so that UsageError raised by commands is the same class as the one caught here.
    from orchestrator.cli import main as _main

    sys.exit(_main())

"""The ``rig`` command line: a thin table of contents over the Python API.

Each command module parses its options, calls one API function and prints; ``common`` holds the
Typer apps they register on, the error and interrupt handling, and the consoles. Every command
turns a RigError into one red line on stderr and exit code 2; Ctrl-C exits 130 after saying what
was kept. Progress goes to stderr, results (tables, JSON) to stdout.
"""

from __future__ import annotations

# Each module registers its commands on import; this order is the order of --help.
# isort: off
from rigcli.cli import people, train, edit, engines  # noqa: F401

# isort: on
from rigcli.cli.common import app

__all__ = ["app", "main"]


def main() -> None:
    """Console-script entry point."""
    app(prog_name="rig")

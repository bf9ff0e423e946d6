"""Helpers shared by the sub-commands (a private module: `pecm.cli` registers only public ones).

Kept free of heavy imports: `pecm --help` imports every command module.
"""

from __future__ import annotations

import json
import sys


def add_progress_flags(p) -> None:
    """``--progress`` / ``--no-progress``: force the progress bars on or off (default: on when stderr is a
    terminal, so a pipe, a log file or a CI job gets none)."""
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--progress",
        dest="progress",
        action="store_const",
        const=True,
        default=None,
        help="show progress bars even when stderr is not a terminal",
    )
    g.add_argument(
        "--no-progress",
        dest="progress",
        action="store_const",
        const=False,
        help="no progress bars (default: only when stderr is a terminal)",
    )


def progress(a, quiet: bool = False):
    """The ``progress`` argument of the library calls: True / False when forced, else None (the library
    then shows bars only when stderr is a terminal). ``quiet`` (e.g. ``--json``) turns the default off."""
    forced = getattr(a, "progress", None)
    if forced is not None:
        return bool(forced)
    return False if quiet else None


def show_progress(a, quiet: bool = False) -> bool:
    """`progress` resolved to a bool (stderr a terminal when not forced)."""
    p = progress(a, quiet)
    return sys.stderr.isatty() if p is None else p


def add_json_flag(p, what: str = "the result") -> None:
    p.add_argument("--json", action="store_true", help=f"print {what} as one JSON object on stdout")


def emit(a, obj: dict, text: str) -> None:
    """Print ``obj`` as one JSON line with ``--json``, else ``text``."""
    print(json.dumps(obj) if getattr(a, "json", False) else text)

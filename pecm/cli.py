"""The `pecm` command line (`pecm ...` or `python -m pecm ...`).

Sub-commands live in `pecm.commands.<name>` modules, each exposing ``register(subparsers)`` which
adds its parser(s) and sets ``func`` (a callable taking the parsed args and returning an exit code).
`main(argv) -> int` returns 0 on success; bad input prints one line ``pecm: error: ...`` to stderr
and returns 2 (1 for other failures) instead of a traceback. A reader that closes the pipe early
(``pecm search ... | head -1``) ends the command quietly with status 141 (128 + SIGPIPE, what a shell
reports for a tool killed by the signal), no traceback.

Start-up cost: ``import pecm`` and the command modules import no torch (`pecm.ops` loads on first use), so
``pecm --help``, ``pecm search --help`` and argument errors return in a fraction of a second; each command
imports torch / the model only after its arguments and input files are checked.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from typing import List, Optional

from . import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pecm", description="PECM cross-modal retrieval engine")
    parser.add_argument("--version", action="version", version=f"pecm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    from . import commands

    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        mod = importlib.import_module(f"{commands.__name__}.{info.name}")
        mod.register(sub)
    return parser


EPIPE_STATUS = 141  # 128 + SIGPIPE


def _quiet_broken_pipe() -> int:
    """The reader closed stdout: point stdout at /dev/null so the interpreter's final flush cannot raise
    again (https://docs.python.org/3/library/signal.html#note-on-sigpipe) and exit quietly."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass
    return EPIPE_STATUS


def main(argv: Optional[List[str]] = None) -> int:
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            parser.print_help()
            return 2
        rc = _call(args)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit flush
        return rc
    except BrokenPipeError:
        return _quiet_broken_pipe()


def _call(args) -> int:
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:
        raise
    except (ValueError, TypeError, FileNotFoundError, FileExistsError, KeyError) as e:
        print(f"pecm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pecm: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a one-line error for anything else, never a silent success
        print(f"pecm: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

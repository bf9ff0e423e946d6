"""The `pecm` command line (`pecm ...` or `python -m pecm ...`).

Sub-commands live in `pecm.commands.<name>` modules, each exposing ``register(subparsers)`` which
adds its parser(s) and sets ``func`` (a callable taking the parsed args and returning an exit code).
`main(argv) -> int` returns 0 on success; bad input prints one line ``pecm: error: ...`` to stderr
and returns 2 (1 for other failures) instead of a traceback.
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


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
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

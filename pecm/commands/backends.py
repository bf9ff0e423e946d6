"""`pecm backends`: which scoring backends load on this host, and why the others do not."""

from __future__ import annotations

import json


def _run(args) -> int:
    from ..backends import available_backends, backend_errors

    avail = available_backends()
    errs = backend_errors()
    if args.json:
        print(json.dumps({"available": avail, "errors": errs}))
    else:
        for name in ("torch", "cpp", "triton"):
            print(f"{name:7s} {'yes' if name in avail else 'no: ' + errs.get(name, '')}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("backends", help="list the scoring backends available on this host")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_run)

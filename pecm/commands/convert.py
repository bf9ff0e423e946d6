"""`pecm convert-checkpoint DIR --trust-pickle`: convert an old checkpoint (pickled ``doc2vec.model``) in place.

The one pecm command that unpickles, and only with ``--trust-pickle``: a crafted pickle runs code while it is
read, so convert only checkpoints from a source you trust. See `pecm.model.legacy.convert_legacy_checkpoint`.
"""

from __future__ import annotations

import json


def _run(a) -> int:
    from ..model.legacy import convert_legacy_checkpoint
    from ..model.pecm import CHECKPOINT_FORMAT

    if not a.trust_pickle:
        raise ValueError(
            f"convert-checkpoint: converting {a.checkpoint} unpickles its doc2vec.model, which can run code: add"
            " --trust-pickle only if you trust whoever made this checkpoint"
        )
    convert_legacy_checkpoint(a.checkpoint, trust_pickle=True)
    print(json.dumps({"checkpoint": a.checkpoint, "format_version": CHECKPOINT_FORMAT}))
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "convert-checkpoint",
        help="convert an old checkpoint (pickled doc2vec.model) to the pickle-free format; unpickles: trusted only",
    )
    p.add_argument("checkpoint", help="checkpoint directory, converted in place")
    p.add_argument(
        "--trust-pickle",
        action="store_true",
        help="required: confirms you trust the checkpoint's source (its pickle is loaded, which can run code)",
    )
    p.set_defaults(func=_run)

"""CLI sub-commands: every public module here exposes ``register(subparsers)`` (see `pecm.cli`)."""

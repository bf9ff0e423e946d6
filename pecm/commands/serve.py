"""`pecm serve INDEX [INDEX ...] --checkpoint CKPT`: the HTTP API (docs/serve.md; needs the ``[serve]`` extra).

Binds 127.0.0.1:8000 by default. A bind address that is not loopback needs ``--token-file`` (exit 2 otherwise).
SIGTERM / SIGINT: stop accepting connections, finish the requests in flight (at most ``--drain-s`` seconds),
close the indexes and exit 0.

``--distributed`` (under torchrun, every rank with the same arguments): rank 0 serves HTTP, every rank
searches its shard of each index (`pecm.serve.sharded`; docs/serve.md, "Sharded serving").
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import signal
import socket


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: treated as non-loopback (it may resolve to anything)


def read_token(path: str) -> str:
    """The bearer token: the file's content without surrounding white space (at least 16 characters)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--token-file: no such file {path!r}")
    with open(path, encoding="utf-8") as f:
        token = f.read().strip()
    if len(token) < 16 or any(c.isspace() for c in token) or not token.isprintable():
        raise ValueError(f"--token-file: {path!r}: expected one token of at least 16 printable characters")
    return token


def _positive(v, name: str) -> None:
    if v < 1:
        raise ValueError(f"{name}: expected an int >= 1, got {v}")


def _run(a) -> int:
    try:
        import uvicorn  # noqa: F401  (the serve extra is checked before anything else)

        from ..serve.app import create_app
        from ..serve.state import State
    except ImportError as e:
        raise ValueError(f"serve: needs the serve extra (pip install 'pecm[serve]'): {e}") from e
    token = read_token(a.token_file) if a.token_file else None
    if not _is_loopback(a.host) and token is None:
        raise ValueError(
            f"--host {a.host}: binding a non-loopback address needs --token-file (refusing to serve "
            "the archive without authentication)"
        )
    if not 0 <= a.port <= 65535:
        raise ValueError(f"--port: expected 0..65535, got {a.port}")
    for v, name in (
        (a.max_batch, "--max-batch"),
        (a.max_k, "--max-k"),
        (a.max_body, "--max-body"),
        (a.max_items, "--max-items"),
    ):
        _positive(v, name)
    if not 0 <= a.max_wait_ms <= 10_000:
        raise ValueError(f"--max-wait-ms: expected 0..10000, got {a.max_wait_ms}")
    if not 0 < a.dist_timeout_s <= 86_400:
        raise ValueError(f"--dist-timeout-s: expected a number of seconds in (0, 86400], got {a.dist_timeout_s}")
    if a.dist_backend and not a.distributed:
        raise ValueError("--dist-backend: only with --distributed")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if a.distributed:
        return _run_distributed(a, token)
    state = State.open(
        a.index, a.checkpoint, image_roots=a.image_root, max_k=a.max_k, max_body=a.max_body, max_items=a.max_items
    )
    try:
        app = create_app(state, token=token, max_batch=a.max_batch, max_wait_ms=a.max_wait_ms)
        server = _server(_config(a, app))
        sock = _bind(a)
        _announce(sock, state, token)
        server.run(sockets=[sock])
    finally:
        state.close()
    return 0


def _config(a, app):
    import uvicorn

    return uvicorn.Config(
        app,
        host=a.host,
        port=a.port,
        log_level=a.log_level,
        access_log=False,
        timeout_graceful_shutdown=a.drain_s,
        lifespan="on",
    )


def _bind(a) -> socket.socket:
    return _listen_socket(a.host, a.port)


def _listen_socket(host: str, port: int) -> socket.socket:
    """The TCP socket bound to ``host:port`` that uvicorn serves on; a bind failure is a ValueError naming
    --host/--port.

    Created with proto ``IPPROTO_TCP``, not the default 0: accepted connections inherit it, and asyncio sets
    ``TCP_NODELAY`` only on sockets whose proto is ``IPPROTO_TCP``. Without it, Nagle's algorithm holds a
    response's body behind its headers until the client's delayed ACK (~40 ms on Linux) on every request after
    the first of a keep-alive connection."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ValueError(f"--host/--port: cannot bind {host}:{port}: {e.strerror}") from None
    return sock


def _announce(sock, state, token, world: int = 1) -> None:
    """The first line printed: ``pecm serve: http://HOST:PORT indexes [...]`` (tests and scripts read the URL)."""
    host, port = sock.getsockname()[:2]
    print(
        f"pecm serve: http://{host}:{port} indexes {sorted(state.indexes)}{' (token required)' if token else ''}"
        + (f", sharded over {world} ranks" if world > 1 else ""),
        flush=True,
    )


def _run_distributed(a, token) -> int:
    """Every rank: join the torchrun group, then serve (rank 0) or search shards (ranks > 0) until stopped."""
    import datetime

    import torch.distributed as dist

    from ..distributed import CollectiveError, init_from_env, shutdown

    rank, world = init_from_env(a.dist_backend)  # torch's default timeout: it covers rank 0's model load
    sync = True
    try:
        group = dist.new_group(timeout=datetime.timedelta(seconds=a.dist_timeout_s))  # the serving messages
        return _serve_rank0(a, token, group, world) if rank == 0 else _follow(a, group, rank)
    except CollectiveError:
        sync = False  # a rank is gone or stuck: no barrier
        raise
    finally:
        shutdown(sync)


def _serve_rank0(a, token, group, world: int) -> int:
    from ..distributed import CollectiveError, check_start, commit_key
    from ..serve import sharded
    from ..serve.app import create_app
    from ..serve.state import State

    state = searcher = server = sock = err = None
    held = {}
    try:
        state = State.open(
            a.index, a.checkpoint, image_roots=a.image_root, max_k=a.max_k, max_body=a.max_body, max_items=a.max_items
        )
        state.world_size = world
        searcher = sharded.ShardedSearch(state, group, a.dist_timeout_s)
        app = create_app(state, token=token, max_batch=a.max_batch, max_wait_ms=a.max_wait_ms, searcher=searcher)
        server = _server(_config(a, app))
        sock = _bind(a)
        held = {n: commit_key(s.reader._current()) for n, s in state.indexes.items()}
    except Exception as e:  # reported to every rank by the start-up exchange, then raised here
        err = e
    started = False
    try:
        check_start(err, held)
        started = True
        searcher.on_fatal = lambda: setattr(server, "should_exit", True)
        _announce(sock, state, token, world)
        server.run(sockets=[sock])
    finally:
        if started:
            searcher.close()  # stop ranks > 0 (already done when the app's lifespan ended)
        if sock is not None:
            sock.close()
        if state is not None:
            state.close()
    if searcher.failed is not None:
        raise CollectiveError(searcher.failed)
    return 0


def _follow(a, group, rank: int) -> int:
    from ..distributed import check_start, commit_key
    from ..index import ArchiveIndex
    from ..serve import sharded
    from ..serve.state import index_name

    readers, held, err = {}, {}, None
    try:
        for p in a.index:
            if not os.path.isdir(p):
                raise FileNotFoundError(f"INDEX: no such directory {p!r}")
            name = index_name(p)
            if name in readers:
                raise ValueError(f"INDEX: two served indexes are named {name!r} (names are directory basenames)")
            readers[name] = ArchiveIndex.open(p)  # read-only: rank 0 is the writer
        held = {n: commit_key(r._current()) for n, r in readers.items()}
    except Exception as e:
        err = e
    try:
        check_start(err, held)
        sharded.follow(readers, group, rank)
    finally:
        for r in readers.values():
            r.close()
    return 0


def _server(config):
    """A uvicorn server that does not re-raise the caught SIGTERM / SIGINT after its graceful shutdown (uvicorn
    does, which would end the process by the signal instead of with exit status 0)."""
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            old = {s: signal.signal(s, self.handle_exit) for s in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for s, h in old.items():
                    signal.signal(s, h)

    return Server(config)


def register(sub) -> None:
    p = sub.add_parser("serve", help="HTTP API: search, ingest and browse archive indexes (docs/serve.md)")
    p.add_argument("index", nargs="+", help="index directories (each served under its basename)")
    p.add_argument("--checkpoint", required=True, help="model checkpoint encoding text / image queries and items")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1; others need --token-file)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free port, printed)")
    p.add_argument("--token-file", help="file holding the bearer token every route but /health and / requires")
    p.add_argument("--max-batch", type=int, default=32, help="search queries per micro-batch (default 32)")
    p.add_argument(
        "--max-wait-ms",
        type=float,
        default=5.0,
        help="how long a micro-batch waits for more queries after the first (default 5 ms)",
    )
    p.add_argument("--max-k", type=int, default=1000, help="largest k of a search (default 1000)")
    p.add_argument("--max-body", type=int, default=16 << 20, help="largest request body in bytes (default 16 MiB)")
    p.add_argument("--max-items", type=int, default=256, help="items per POST /items (default 256)")
    p.add_argument(
        "--image-root",
        action="append",
        metavar="DIR",
        help="folder GET /items/{id}/image may read (repeatable; default: the folders of the items' "
        "sources at start-up) - the upload folder INDEX/uploads is always one",
    )
    p.add_argument("--drain-s", type=int, default=5, help="seconds to finish in-flight requests on SIGTERM")
    p.add_argument("--log-level", default="warning", choices=("critical", "error", "warning", "info", "debug"))
    p.add_argument(
        "--distributed",
        action="store_true",
        help="under torchrun: rank 0 serves HTTP, every rank searches its shard of each index (docs/serve.md)",
    )
    p.add_argument(
        "--dist-timeout-s",
        type=float,
        default=300.0,
        help="--distributed: a rank that does not answer within this many seconds fails the group (default 300)",
    )
    p.add_argument(
        "--dist-backend",
        choices=("gloo", "nccl"),
        help="--distributed: torch.distributed backend (default: nccl when CUDA is available, else gloo)",
    )
    p.set_defaults(func=_run)

"""The `pecm serve` HTTP API (FastAPI): routes, bearer-token auth, request metrics. See docs/serve.md.

``create_app(state, token=None, max_batch=32, max_wait_ms=5, searcher=None)`` builds the app around an open
`pecm.serve.state.State`; the app's lifespan starts and stops the search micro-batcher (the caller closes the
state). ``searcher``: how the batcher searches (`pecm.serve.batcher.LocalSearch` when None;
`pecm.serve.sharded.ShardedSearch` for ``pecm serve --distributed``). With ``token`` every route except
``/health`` and ``/`` needs ``Authorization: Bearer <token>``, compared with `hmac.compare_digest`. ``/`` is
the search page (`page`: ``static/``, plain JS calling the JSON routes with the token the user enters);
``/indexes`` lists the served indexes for it.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import time
from typing import Optional

from fastapi import FastAPI, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import HTMLResponse, JSONResponse, Response

from .. import __version__
from .batcher import Batcher
from .errors import APIError, bad, error_response, from_exception, install_handlers, read_json
from .metrics import CONTENT_TYPE, Metrics
from .parse import parse_items, parse_search

OPEN_PATHS = ("/health", "/")
MAX_ID = 2**63 - 1


def page() -> tuple:
    """(HTML, headers) of the search page at ``GET /``: ``static/index.html`` with ``page.css`` and ``page.js``
    inlined (package data; one self-contained response, nothing fetched from elsewhere) and a
    Content-Security-Policy that allows exactly those two inline blocks (by hash), fetches to this origin and
    ``blob:`` thumbnails."""
    from importlib.resources import files

    static = files(__package__).joinpath("static")
    html, css, js = (static.joinpath(n).read_text(encoding="utf-8") for n in ("index.html", "page.css", "page.js"))
    for name, text in (("page.css", css), ("page.js", js)):
        if "</" in text:  # would end the inline <style> / <script> early
            raise ValueError(f"pecm/serve/static/{name}: must not contain '</'")
    html = html.replace("/*PECM_CSS*/", css, 1).replace("/*PECM_JS*/", js, 1)

    def digest(text: str) -> str:
        return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"

    csp = (
        f"default-src 'none'; script-src {digest(js)}; style-src {digest(css)}; img-src 'self' blob:; "
        "connect-src 'self'; form-action 'none'; base-uri 'none'; frame-ancestors 'none'"
    )
    headers = {
        "Content-Security-Policy": csp,
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "Cache-Control": "no-store",
    }
    return html, headers


class _Guard:
    """ASGI middleware: bearer-token check, then request count / latency by route template."""

    def __init__(self, app, token: Optional[str], metrics: Metrics):
        self.app, self.metrics = app, metrics
        self.token = None if token is None else token.encode()

    def _authorized(self, scope) -> bool:
        got = b""
        for k, v in scope.get("headers") or ():
            if k == b"authorization":
                got = v
                break
        scheme, _, cred = got.partition(b" ")
        # compare_digest on equal-type bytes: time independent of where the token differs
        return hmac.compare_digest(cred.strip(), self.token) and scheme.lower() == b"bearer"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, status = time.perf_counter(), [500]

        async def send_status(msg):
            if msg["type"] == "http.response.start":
                status[0] = msg["status"]
            await send(msg)

        try:
            if self.token is not None and scope["path"] not in OPEN_PATHS and not self._authorized(scope):
                resp = error_response(
                    401,
                    "authorization: expected the header 'Authorization: Bearer <token>' with the server's token",
                    "authorization",
                    headers={"WWW-Authenticate": "Bearer"},
                )
                await resp(scope, receive, send_status)
            else:
                await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")
            label = getattr(route, "path", None) or "unmatched"
            self.metrics.observe_request(label, scope.get("method", ""), status[0], time.perf_counter() - t0)


def _query_params(request: Request, allowed) -> dict:
    out = {}
    for key, v in request.query_params.multi_items():
        if key not in allowed:
            raise bad(key, f"unknown query parameter (expected some of {list(allowed)})")
        if key in out:
            raise bad(key, "given twice")
        out[key] = v
    return out


def _item_id(raw: str) -> int:
    if not raw.isascii() or not raw.isdigit() or len(raw) > 19 or int(raw) > MAX_ID:
        raise bad("id", f"expected a non-negative integer item id, got {raw[:40]!r}")
    return int(raw)


def _bool(v: Optional[str], name: str) -> bool:
    if v is None:
        return False
    if v.lower() in ("1", "true", "yes"):
        return True
    if v.lower() in ("0", "false", "no"):
        return False
    raise bad(name, f"expected true or false, got {v[:20]!r}")


def create_app(
    state, token: Optional[str] = None, max_batch: int = 32, max_wait_ms: float = 5.0, searcher=None
) -> FastAPI:
    metrics = Metrics()
    batcher = Batcher(state, max_batch, max_wait_ms, on_batch=metrics.observe_batch, searcher=searcher)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await batcher.start()
        try:
            yield
        finally:
            await batcher.stop()

    app = FastAPI(
        title="pecm serve", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None
    )
    app.state.pecm, app.state.metrics, app.state.batcher = state, metrics, batcher
    install_handlers(app)
    app.add_middleware(_Guard, token=token, metrics=metrics)

    def _served(request: Request, allowed=("index",)):
        params = _query_params(request, allowed)
        return state.index_for(params.get("index")), params

    html, page_headers = page()

    @app.get("/")
    async def get_page():
        return HTMLResponse(html, headers=page_headers)

    @app.get("/indexes")
    async def indexes():
        described = await run_in_threadpool(lambda: [s.describe() for s in state.indexes.values()])
        return {"indexes": described, "world_size": state.world_size}

    @app.get("/health")
    async def health():
        failed = getattr(batcher.searcher, "failed", None)
        if failed is not None:  # --distributed: a rank failed; the server is stopping
            return JSONResponse(
                {"status": "failed", "version": __version__, "world_size": state.world_size, "error": failed},
                status_code=503,
            )
        return {"status": "ok", "version": __version__, "world_size": state.world_size}

    @app.get("/metrics")
    async def get_metrics():
        live = await run_in_threadpool(lambda: {n: len(s.reader) for n, s in state.indexes.items()})
        return Response(metrics.render(live), media_type=CONTENT_TYPE)

    @app.post("/search")
    async def search(request: Request):
        t0 = time.perf_counter()
        _query_params(request, ())
        query = parse_search(await read_json(request, state.max_body), state, state.max_k)
        out = await batcher.submit(query)
        # a JSONResponse of the plain dict: FastAPI would first walk it with jsonable_encoder (~0.2 ms per
        # k=10 response on the event loop, which every request passes through); the JSON is the same
        return JSONResponse({**out, "took_ms": round((time.perf_counter() - t0) * 1000.0, 3)})

    @app.post("/items")
    async def add_items(request: Request):
        _query_params(request, ())
        body = await read_json(request, state.max_body)
        served = state.index_for(body.get("index"))
        items = parse_items(body, served.K, served.D, state.max_items)
        try:
            ids = await run_in_threadpool(state.ingest, served, items)
        except APIError:
            raise
        except (ValueError, TypeError) as e:
            raise from_exception(e, "items") from None
        except OSError as e:  # e.g. the disk is full: nothing was committed (ArchiveIndex.add rolls back)
            raise APIError(503, None, f"index {served.name!r}: the append failed and was rolled back: {e}") from None
        return JSONResponse({"ids": [int(i) for i in ids], "index": served.name}, status_code=201)

    @app.get("/items/{item_id}")
    async def get_item(request: Request, item_id: str):
        i = _item_id(item_id)
        served, params = _served(request, ("index", "vectors"))
        vectors = _bool(params.get("vectors"), "vectors")
        try:
            row = (await run_in_threadpool(served.reader.get, [i], vectors))[0]
        except KeyError:
            raise bad("id", f"unknown or deleted item {i} in index {served.name!r}", 404) from None
        out = {"id": i, "index": served.name, "metadata": {k: v for k, v in row.items() if k not in VECTOR_KEYS}}
        if vectors:
            out["prototypes"] = row["prototypes"].tolist()
            out["mask"] = row["mask"].tolist()
            out["pooled"] = row["pooled"].tolist()
        return JSONResponse(out)  # plain lists and dicts (jsonable_encoder on K*D floats: ~5 ms, for nothing)

    @app.get("/items/{item_id}/image")
    async def get_image(request: Request, item_id: str):
        i = _item_id(item_id)
        served, _ = _served(request)

        def read():
            try:
                row = served.reader.get([i])[0]
            except KeyError:
                raise bad("id", f"unknown or deleted item {i} in index {served.name!r}", 404) from None
            return served.read_image(i, row.get("source"))

        data, mime = await run_in_threadpool(read)
        return Response(data, media_type=mime, headers={"X-Content-Type-Options": "nosniff"})

    @app.delete("/items/{item_id}")
    async def delete_item(request: Request, item_id: str):
        i = _item_id(item_id)
        served, _ = _served(request)
        try:
            await run_in_threadpool(state.delete, served, i)
        except KeyError:
            raise bad("id", f"unknown or deleted item {i} in index {served.name!r}", 404) from None
        except OSError as e:
            raise APIError(503, None, f"index {served.name!r}: the delete failed and was not committed: {e}") from None
        return {"deleted": i, "index": served.name}

    return app


VECTOR_KEYS = ("prototypes", "mask", "pooled")

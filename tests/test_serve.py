"""`pecm serve` routes in-process (FastAPI TestClient): health / page / metrics, search by text, image,
prototypes and id (equal to `pecm search --json`), items (get, image, ingest, delete), image-root safety,
bearer-token auth, and every kind of bad input -> a 4xx JSON error naming the field."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402
from serve_fixtures import REPORTS, b64, build_archive, image_bytes, second_index  # noqa: E402

from pecm.cli import main  # noqa: E402
from pecm.serve.app import create_app  # noqa: E402
from pecm.serve.state import State  # noqa: E402

TOKEN = "s3cret-token-0123456789"


@pytest.fixture(scope="module")
def arch(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    a = build_archive(root)
    from pecm.index import ArchiveIndex

    with ArchiveIndex.open(a["index"]) as ix:
        a["K"], a["D"] = ix.K, ix.D
    a["other"] = second_index(root / "other", a["K"], a["D"])
    return a


@pytest.fixture(scope="module")
def state(arch):
    st = State.open([arch["index"], arch["other"]], arch["ckpt"])
    yield st
    st.close()


@pytest.fixture(scope="module")
def client(state):
    with TestClient(create_app(state), raise_server_exceptions=False) as c:
        yield c


@pytest.fixture(scope="module")
def auth_client(state):
    with TestClient(create_app(state, token=TOKEN), raise_server_exceptions=False) as c:
        yield c


def _cli_search(capsys, arch, *args):
    capsys.readouterr()
    rc = main(["search", arch["index"], "--checkpoint", arch["ckpt"], *[str(a) for a in args], "--json"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    return json.loads(out)


def _same_as_cli(res: dict, cli: dict) -> None:
    hits = res["results"]
    n = sum(1 for i in cli["ids"][0] if i >= 0)
    assert [h["id"] for h in hits] == cli["ids"][0][:n]
    assert [h["score"] for h in hits] == cli["scores"][0][:n]  # identical floats
    assert [h["sim"] for h in hits] == cli["sim"][0][:n]
    assert [h["conf"] for h in hits] == cli["conf"][0][:n]
    assert [h["metadata"] for h in hits] == cli["metadata"][0][:n]


# ---------------------------------------------------------------------------------------------- basics
def test_health_page_and_metrics(client):
    r = client.get("/health")
    assert r.status_code == 200 and r.json()["status"] == "ok" and r.json()["world_size"] == 1
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html") and "pecm" in r.text
    assert client.post("/search", json={"index": "arch", "text": REPORTS[0], "k": 2}).status_code == 200
    assert client.post("/search", json={"index": "arch", "k": 2}).status_code == 422
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    assert 'pecm_requests_total{route="/search",method="POST",status="200"}' in text
    assert 'pecm_requests_total{route="/search",method="POST",status="422"}' in text
    assert 'pecm_request_duration_seconds_bucket{route="/search",le="+Inf"}' in text
    assert "# TYPE pecm_search_batch_size histogram" in text and "pecm_search_batch_size_count" in text
    assert 'pecm_index_items{index="arch"} 14' in text
    for line in text.splitlines():  # every sample line is "name{labels} value"
        if line and not line.startswith("#"):
            float(line.rsplit(" ", 1)[1])


def test_page_is_self_contained_with_a_strict_csp(client):
    import base64
    import hashlib
    import re

    r = client.get("/")
    html, csp = r.text, r.headers["content-security-policy"]
    assert r.headers["x-content-type-options"] == "nosniff" and r.headers["cache-control"] == "no-store"
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp and "'unsafe-inline'" not in csp
    blocks = re.findall(r"<(script|style)>(.*?)</\1>", html, re.S)
    assert sorted(t for t, _ in blocks) == ["script", "style"]
    for tag, body in blocks:  # each inline block is allowed by its hash, nothing else
        digest = base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()
        assert f"{tag}-src 'sha256-{digest}'" in csp
    assert "PECM_" not in html and "innerHTML" not in html  # both blocks inlined; server text never parsed
    assert not re.search(r"(src|href)=[\"']?(https?:)?//", html)  # nothing loaded from elsewhere


def test_indexes(client, arch):
    assert client.get("/indexes").json()["world_size"] == 1
    got = client.get("/indexes").json()["indexes"]
    assert [ix["name"] for ix in got] == ["arch", "other"]
    assert got[0] == {
        "name": "arch",
        "K": arch["K"],
        "D": arch["D"],
        "dtype": "float16",
        "count": 14,
        "modalities": {"image": 8, "text": 6},
    }
    assert got[1]["count"] == 30 and got[1]["modalities"] == {"text": 30}


# ---------------------------------------------------------------------------------------------- search
@pytest.mark.parametrize("by", ["score", "sim"])
def test_search_text_equals_cli(client, arch, capsys, by):
    r = client.post("/search", json={"index": "arch", "text": REPORTS[1], "k": 5, "by": by})
    assert r.status_code == 200, r.text
    res = r.json()
    assert res["index"] == "arch" and res["took_ms"] >= 0 and len(res["results"]) == 5
    assert set(res["results"][0]) == {"id", "score", "sim", "conf", "metadata"}
    _same_as_cli(res, _cli_search(capsys, arch, "--text", REPORTS[1], "-k", 5, "--by", by))
    if by == "score":
        for h in res["results"]:
            assert h["score"] == pytest.approx(h["sim"] * h["conf"], abs=1e-4)


def test_search_image_and_where_equal_cli(client, arch, capsys):
    path = arch["images"][3]
    raw = open(path, "rb").read()
    r = client.post("/search", json={"index": "arch", "image": b64(raw), "k": 4})
    assert r.status_code == 200, r.text
    _same_as_cli(r.json(), _cli_search(capsys, arch, "--image", path, "-k", 4))
    body = {"index": "arch", "image": b64(raw), "k": 20, "where": {"modality": "text"}}
    res = client.post("/search", json=body).json()
    assert len(res["results"]) == 6 and all(h["metadata"]["modality"] == "text" for h in res["results"])
    _same_as_cli(res, _cli_search(capsys, arch, "--image", path, "-k", 20, "--where", "modality=text"))


def test_search_prototypes_and_more_like_this(client, arch):
    item = client.get("/items/2", params={"index": "arch", "vectors": "true"}).json()
    assert np.asarray(item["prototypes"]).shape == (arch["K"], arch["D"]) and len(item["mask"]) == arch["K"]
    by_id = client.post("/search", json={"index": "arch", "id": 2, "k": 3}).json()
    assert by_id["results"][0]["id"] == 2 and by_id["results"][0]["score"] == pytest.approx(1.0, abs=1e-3)
    body = {"index": "arch", "prototypes": item["prototypes"], "mask": item["mask"], "k": 3}
    assert client.post("/search", json=body).json()["results"] == by_id["results"]
    nomask = client.post("/search", json={"index": "arch", "prototypes": item["prototypes"], "k": 3}).json()
    assert [h["id"] for h in nomask["results"]][0] == 2
    res = client.post("/search", json={"index": "other", "id": 4, "k": 30, "where": {"site": 1}}).json()
    assert res["index"] == "other" and len(res["results"]) == 10
    assert all(h["metadata"]["site"] == 1 for h in res["results"])


# ---------------------------------------------------------------------------------------------- items
def test_get_item_and_image(client, arch):
    r = client.get("/items/0", params={"index": "arch"})
    assert r.status_code == 200
    meta = r.json()["metadata"]
    assert meta["modality"] == "image" and meta["source"] == arch["images"][0]
    r = client.get("/items/0/image", params={"index": "arch"})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.content == open(arch["images"][0], "rb").read()
    r = client.get("/items/2/image", params={"index": "arch"})
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    r = client.get("/items/9/image", params={"index": "arch"})  # a report: no source
    assert r.status_code == 404 and r.json()["field"] == "id"


def test_ingest_get_search_delete(client, arch):
    rng = np.random.default_rng(5)
    p = rng.standard_normal((arch["K"], arch["D"])).tolist()
    items = [
        {"prototypes": p, "metadata": {"site": 7, "note": "given"}},
        {"text": "Pneumothorax on the right. Chest tube advised.", "metadata": {"site": 7}},
        {"image": b64(image_bytes(42)), "metadata": {"site": 7}},
    ]
    r = client.post("/items", json={"index": "other", "items": items})
    assert r.status_code == 201, r.text
    ids = r.json()["ids"]
    assert len(ids) == 3 and ids[0] == 30
    got = [client.get(f"/items/{i}", params={"index": "other"}).json()["metadata"] for i in ids]
    assert got[0]["note"] == "given" and got[1]["modality"] == "text" and got[1]["text"].startswith("Pneumothorax")
    assert got[2]["modality"] == "image" and got[2]["source"].startswith(os.path.join(arch["other"], "uploads"))
    img = client.get(f"/items/{ids[2]}/image", params={"index": "other"})
    assert img.status_code == 200 and img.content == image_bytes(42)
    other = client.get("/indexes").json()["indexes"][1]
    assert other["count"] == 33 and other["modalities"] == {"image": 1, "text": 31, "null": 1}
    res = client.post("/search", json={"index": "other", "prototypes": p, "k": 1}).json()
    assert res["results"][0]["id"] == ids[0]
    res = client.post("/search", json={"index": "other", "id": ids[0], "k": 50, "where": {"site": 7}}).json()
    assert sorted(h["id"] for h in res["results"]) == ids
    r = client.delete(f"/items/{ids[0]}", params={"index": "other"})
    assert r.status_code == 200 and r.json() == {"deleted": ids[0], "index": "other"}
    assert client.get(f"/items/{ids[0]}", params={"index": "other"}).status_code == 404
    res = client.post("/search", json={"index": "other", "prototypes": p, "k": 40}).json()
    assert ids[0] not in [h["id"] for h in res["results"]]
    other = client.get("/indexes").json()["indexes"][1]  # a tombstoned item leaves the counts
    assert other["count"] == 32 and other["modalities"] == {"image": 1, "text": 31}
    assert client.delete(f"/items/{ids[0]}", params={"index": "other"}).status_code == 404
    assert client.post("/search", json={"index": "other", "id": ids[0]}).status_code == 404


def test_image_route_refuses_paths_outside_the_roots(client, arch, tmp_path):
    root = arch["root"]
    secret = os.path.join(root, "secret.png")
    with open(secret, "wb") as f:
        f.write(image_bytes(9))
    link = os.path.join(arch["image_dir"], "link.png")  # inside a root, pointing outside it
    if not os.path.lexists(link):
        os.symlink(secret, link)
    notes = os.path.join(arch["image_dir"], "notes.txt")
    with open(notes, "w") as f:
        f.write("not an image")
    sources = {
        "/etc/passwd": 403,
        os.path.join(arch["image_dir"], "..", "secret.png"): 403,  # traversal
        link: 403,  # symlink escape
        notes: 415,  # under a root, not an image
        os.path.join(arch["image_dir"], "missing.png"): 404,
        os.path.join(arch["image_dir"], "img1.png"): 200,
    }
    p = np.ones((arch["K"], arch["D"])).tolist()
    items = [{"prototypes": p, "metadata": {"source": s}} for s in sources]
    ids = client.post("/items", json={"index": "arch", "items": items}).json()["ids"]
    for i, (s, want) in zip(ids, sources.items()):
        r = client.get(f"/items/{i}/image", params={"index": "arch"})
        assert r.status_code == want, (s, r.text)
        if want != 200:
            assert r.json()["field"] == "id" and "error" in r.json()
    for i in ids:
        assert client.delete(f"/items/{i}", params={"index": "arch"}).status_code == 200


# ---------------------------------------------------------------------------------------------- auth
def test_auth(auth_client, monkeypatch):
    import hmac

    calls = []
    real = hmac.compare_digest
    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: calls.append((a, b)) or real(a, b))
    body = {"index": "arch", "text": REPORTS[0], "k": 1}
    assert auth_client.get("/health").status_code == 200
    assert auth_client.get("/").status_code == 200
    for headers in (
        {},
        {"Authorization": "Bearer wrong-token-0123456789"},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": TOKEN},
    ):
        for method, path, kw in (
            ("post", "/search", {"json": body}),
            ("get", "/metrics", {}),
            ("get", "/indexes", {}),
            ("get", "/items/0", {"params": {"index": "arch"}}),
            ("delete", "/items/0", {"params": {"index": "arch"}}),
        ):
            r = getattr(auth_client, method)(path, headers=headers, **kw)
            assert r.status_code == 401, (headers, path)
            assert r.json()["field"] == "authorization" and r.headers["www-authenticate"] == "Bearer"
    assert calls and all(isinstance(a, bytes) and b == TOKEN.encode() for a, b in calls)
    ok = {"Authorization": f"Bearer {TOKEN}"}
    assert auth_client.post("/search", json=body, headers=ok).status_code == 200
    assert auth_client.get("/metrics", headers=ok).status_code == 200


def test_non_loopback_bind_without_token_is_refused(arch, capsys):
    rc = main(["serve", arch["index"], "--checkpoint", arch["ckpt"], "--host", "0.0.0.0"])
    assert rc == 2 and "--token-file" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- bad input
_P = [[0.5] * 16] * 5  # the tiny checkpoint: K = 5, D = 16
_GIF = b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\xff\xff\xff!\xf9\x04\x01\x00\x00\x00\x00,\x00\x00\x00\x00"
_GIF += b"\x01\x00\x01\x00\x00\x02\x02D\x01\x00;"
BAD_SEARCH = [
    (b"{", 400, "body"),
    (b"[1, 2]", 400, "body"),
    (b'{"text": NaN}', 400, "body"),
    (b"", 400, "body"),
    (b"\xff\xfe", 400, "body"),
    ({"index": "arch"}, 422, "query"),
    ({"index": "arch", "text": "x", "id": 1}, 422, "query"),
    ({"index": "arch", "text": "x", "foo": 1}, 422, "foo"),
    ({"index": "arch", "text": "x", "k": 0}, 422, "k"),
    ({"index": "arch", "text": "x", "k": -3}, 422, "k"),
    ({"index": "arch", "text": "x", "k": "10"}, 422, "k"),
    ({"index": "arch", "text": "x", "k": True}, 422, "k"),
    ({"index": "arch", "text": "x", "k": 10**12}, 422, "k"),
    ({"index": "arch", "text": "x", "k": 2.5}, 422, "k"),
    ({"index": "arch", "text": "x", "mode": "fast"}, 422, "mode"),
    ({"index": "arch", "text": "x", "mode": "ann"}, 422, "mode"),
    ({"index": "arch", "text": "x", "by": "rank"}, 422, "by"),
    ({"index": "arch", "text": "x", "where": [1]}, 422, "where"),
    ({"index": "arch", "text": "x", "where": {"site": [1]}}, 422, "where"),
    ({"index": "arch", "text": "x", "where": {"": 1}}, 422, "where"),
    ({"index": "arch", "text": ""}, 422, "text"),
    ({"index": "arch", "text": 12}, 422, "text"),
    ({"index": "arch", "image": "!!notbase64!!"}, 422, "image"),
    ({"index": "arch", "image": b64(b"hello world")}, 422, "image"),
    ({"index": "arch", "image": b64(_GIF)}, 422, "image"),
    ({"index": "arch", "image": b64(image_bytes(1)[:60])}, 422, "image"),
    ({"index": "arch", "image": 5}, 422, "image"),
    ({"index": "arch", "prototypes": [[0.5] * 15] * 5}, 422, "prototypes"),
    ({"index": "arch", "prototypes": [[0.5] * 16] * 4}, 422, "prototypes"),
    ({"index": "arch", "prototypes": [["a"] * 16] * 5}, 422, "prototypes"),
    ({"index": "arch", "prototypes": [[0.5] * 15 + [True]] + [[0.5] * 16] * 4}, 422, "prototypes"),
    ({"index": "arch", "prototypes": [[0.5] * 16] * 4 + [[None] * 16]}, 422, "prototypes"),
    ({"index": "arch", "prototypes": [[1e39] * 16] * 5}, 422, "prototypes"),
    ({"index": "arch", "prototypes": _P, "mask": [True] * 4}, 422, "mask"),
    ({"index": "arch", "prototypes": _P, "mask": [1, 0, 1, 1, 1]}, 422, "mask"),
    ({"index": "arch", "text": "x", "mask": [True] * 5}, 422, "mask"),
    ({"index": "arch", "id": -1}, 422, "id"),
    ({"index": "arch", "id": "3"}, 422, "id"),
    ({"index": "arch", "id": 10**6}, 404, "id"),
    ({"index": "nope", "text": "x"}, 404, "index"),
    ({"index": 3, "text": "x"}, 404, "index"),
    ({"text": "x"}, 422, "index"),
]


@pytest.mark.parametrize("body,status,field", BAD_SEARCH)
def test_bad_search_is_4xx_json_naming_the_field(client, body, status, field):
    if isinstance(body, bytes):
        r = client.post("/search", content=body, headers={"content-type": "application/json"})
    else:
        r = client.post("/search", json=body)
    assert r.status_code == status, r.text
    err = r.json()
    assert err["field"] == field and err["error"].startswith(field), err


BAD_OTHER = [
    ("get", "/items/abc", {"params": {"index": "arch"}}, 422, "id"),
    ("get", "/items/99999999999999999999", {"params": {"index": "arch"}}, 422, "id"),
    ("get", "/items/99999", {"params": {"index": "arch"}}, 404, "id"),
    ("get", "/items/0", {"params": {"index": "arch", "foo": "1"}}, 422, "foo"),
    ("get", "/items/0", {"params": {"index": "arch", "vectors": "maybe"}}, 422, "vectors"),
    ("get", "/items/0", {}, 422, "index"),
    ("get", "/items/0/image", {"params": {"index": "zzz"}}, 404, "index"),
    ("delete", "/items/99999", {"params": {"index": "other"}}, 404, "id"),
    ("delete", "/items/-1", {"params": {"index": "other"}}, 422, "id"),
    ("post", "/items", {"json": {"index": "other", "items": []}}, 422, "items"),
    ("post", "/items", {"json": {"index": "other", "items": "x"}}, 422, "items"),
    ("post", "/items", {"json": {"index": "other", "items": [5]}}, 422, "items[0]"),
    ("post", "/items", {"json": {"index": "other", "items": [{"text": "a", "image": "b"}]}}, 422, "items[0]"),
    ("post", "/items", {"json": {"index": "other", "items": [{"text": "a", "x": 1}]}}, 422, "items[0].x"),
    (
        "post",
        "/items",
        {"json": {"index": "other", "items": [{"text": "a", "metadata": {"id": 3}}]}},
        422,
        "items[0].metadata.id",
    ),
    (
        "post",
        "/items",
        {"json": {"index": "other", "items": [{"image": b64(image_bytes(1)), "metadata": {"source": "/etc/passwd"}}]}},
        422,
        "items[0].metadata.source",
    ),
    (
        "post",
        "/items",
        {"json": {"index": "other", "items": [{"text": "a", "metadata": {"modality": 3}}]}},
        422,
        "items[0].metadata.modality",
    ),
    ("post", "/items", {"json": {"index": "other", "items": [{"prototypes": [[1.0]]}]}}, 422, "items[0].prototypes"),
    ("post", "/items", {"json": {"index": "other", "items": [{"image": "??"}]}}, 422, "items[0].image"),
    ("post", "/items", {"json": {"index": "other", "extra": 1, "items": [{"text": "a"}]}}, 422, "extra"),
    ("post", "/items", {"json": {"items": [{"text": "a"}]}}, 422, "index"),
    ("post", "/search?x=1", {"json": {"index": "arch", "text": "x"}}, 422, "x"),
    ("get", "/nowhere", {}, 404, "path"),
    ("put", "/search", {"json": {}}, 405, "method"),
]


@pytest.mark.parametrize("method,path,kw,status,field", BAD_OTHER)
def test_bad_requests_are_4xx_json_naming_the_field(client, method, path, kw, status, field):
    r = getattr(client, method)(path, **kw)
    assert r.status_code == status, r.text
    err = r.json()
    assert err["field"] == field and err["error"].startswith(field), err


def test_oversized_body_is_413(client, state, monkeypatch):
    monkeypatch.setattr(state, "max_body", 1000)
    body = {"index": "arch", "text": "x" * 2000}
    r = client.post("/search", json=body)
    assert r.status_code == 413 and r.json()["field"] == "body"

    def chunks():  # no content-length: counted while streaming
        yield b'{"index": "arch", "text": "'
        for _ in range(10):
            yield b"x" * 200
        yield b'"}'

    r = client.post("/search", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["field"] == "body"
    assert client.post("/search", json={"index": "arch", "text": "x", "k": 1}).status_code == 200

"""A tiny real archive for the `pecm serve` tests: a random-init tiny PECM checkpoint (no weights downloaded),
a folder of small PNG / JPEG images, and an index filled through `pecm index add --checkpoint` (images, then
reports), as a user would build it."""

from __future__ import annotations

import base64
import io
import os

import numpy as np

REPORTS = [
    "Chest x-ray shows no acute findings.",
    "Large left pleural effusion. Heart size normal.",
    "Fracture of the left femur. No dislocation.",
    "Small nodule in the right upper lobe. Follow up advised. Lungs otherwise clear.",
    "Axial CT of the abdomen. Liver lesion measuring two centimetres.",
    "MRI of the brain. No mass effect. Ventricles normal.",
]


def image_bytes(seed: int, fmt: str = "PNG", size=(48, 40)) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def build_archive(root) -> dict:
    """{"ckpt", "index", "images": [paths], "image_dir"} under ``root`` (a pathlib.Path)."""
    import torch

    from pecm.cli import main
    from pecm.model.config import PECMConfig
    from pecm.model.pecm import PECM

    torch.manual_seed(0)
    ckpt = root / "ckpt"
    model = PECM(PECMConfig.tiny(), load_pretrained=False)
    model.text.fit(REPORTS * 3)
    model.save(str(ckpt))
    img_dir = root / "images"
    img_dir.mkdir()
    paths = []
    for i in range(8):
        fmt = "JPEG" if i % 3 == 2 else "PNG"
        p = img_dir / f"img{i}.{'jpg' if fmt == 'JPEG' else 'png'}"
        p.write_bytes(image_bytes(i, fmt, size=(40 + 3 * i, 36)))
        paths.append(str(p))
    (root / "reports.txt").write_text("\n".join(REPORTS) + "\n")
    ix = root / "arch"
    quiet = ["--no-progress"]
    assert main(["index", "create", str(ix), "--checkpoint", str(ckpt)]) == 0
    assert main(["index", "add", str(ix), "--checkpoint", str(ckpt), "--images", *paths, *quiet]) == 0
    texts = ["index", "add", str(ix), "--checkpoint", str(ckpt), "--texts-file", str(root / "reports.txt"), *quiet]
    assert main(texts) == 0
    return {"ckpt": str(ckpt), "index": str(ix), "images": paths, "image_dir": str(img_dir), "root": str(root)}


def second_index(path, K: int, D: int, n: int = 30, seed: int = 1) -> str:
    """An index of ``n`` random items (metadata ``site`` = i % 3) with the given shape."""
    from pecm.index import ArchiveIndex

    rng = np.random.default_rng(seed)
    with ArchiveIndex.create(path, K, D) as ix:
        meta = [{"modality": "text", "text": f"r{i}", "site": i % 3} for i in range(n)]
        ix.add(rng.standard_normal((n, K, D)).astype(np.float32), rng.random((n, K)) > 0.2, metadata=meta)
    return os.fspath(path)


def wait_for_server(proc, timeout: float = 30.0) -> str:
    """The URL a `pecm serve --port 0` subprocess prints on its first line, once its /health answers."""
    import time

    import httpx

    line = proc.stdout.readline()
    assert line.startswith("pecm serve: http://127.0.0.1:"), (line, proc.stderr.read() if proc.poll() else "")
    url = line.split()[2]
    deadline = time.time() + timeout
    while True:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return url
        except httpx.TransportError:
            if time.time() > deadline:
                raise
            time.sleep(0.1)

"""What the page needs from the server, without a browser: API docs that work offline, the example
cells, the favicon, and a heatmap scale that reads from dark (no evidence) to bright (strongest)."""

from __future__ import annotations

import re

import numpy as np
import pytest
from fastapi.testclient import TestClient

from malaria_detect.cells.heatmaps import _colormap
from malaria_detect.serve.app import STATIC, Settings, create_app


@pytest.fixture(scope="module")
def client(bundled):
    with TestClient(create_app(Settings(model=None), bundled)) as c:
        yield c


def _local_assets(html: str) -> list[str]:
    return re.findall(r"""(?:src|href)=["']([^"']+)["']""", html) + re.findall(r"""url:\s*'([^']+)'""", html)


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_api_docs_load_nothing_from_outside(client, page):
    r = client.get(page)
    assert r.status_code == 200 and "text/html" in r.headers["content-type"]
    assert not re.search(r"https?://|//cdn|fonts\.googleapis", r.text), "docs page refers to an external URL"
    assets = _local_assets(r.text)
    assert any(a.endswith(".js") for a in assets)
    for a in assets:
        got = client.get(a)
        assert got.status_code == 200, a
        if a.endswith(".js"):
            assert len(got.content) > 100_000, a  # the real Swagger UI / ReDoc bundle, not a stub
    assert "validatorUrl" not in r.text or '"validatorUrl": null' in r.text  # no badge from an online validator


def test_favicon_and_example_cells_are_served(client):
    assert client.get("/favicon.ico").headers["content-type"].startswith("image/svg")
    index = client.get("/").text
    assert 'rel="icon"' in index
    examples = re.findall(r'data-src="([^"]+)"', index)
    assert 4 <= len(examples) <= 6
    for src in examples:
        r = client.get(src)
        assert r.status_code == 200 and r.content[:4] == b"RIFF", src  # WebP
    assert {p.name for p in (STATIC / "examples").iterdir()} == {s.rsplit("/", 1)[1] for s in examples}


def test_examples_give_the_answers_their_captions_promise(client):
    files = [("files", (p.name, p.read_bytes(), "image/webp")) for p in sorted((STATIC / "examples").iterdir())]
    got = {r["filename"]: r for r in client.post("/predict", files=files).json()}
    for name, r in got.items():
        if name.startswith("smear-field"):
            assert r["ood"], r  # the "not a single cell" example
        else:
            assert not r["ood"] and r["label"].lower() == name.split("-")[0], r


def test_heatmap_scale_is_perceptually_ordered():
    rgb = _colormap(np.linspace(0, 1, 256)).astype(float)
    lum = rgb @ [0.2126, 0.7152, 0.0722]
    assert rgb.shape == (256, 3) and lum[0] < 5 and lum[-1] > 230
    assert np.all(np.diff(lum) >= -0.5)  # brightness rises monotonically: readable in greyscale
    assert _colormap(np.zeros((4, 5))).shape == (4, 5, 3)

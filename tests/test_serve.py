"""REST API with FastAPI's TestClient on real sample cells and on malformed uploads."""

from __future__ import annotations

import base64
import io
import struct
import zlib

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from malaria_detect.serve.app import Settings, create_app

# Sample cells (patients the bundled model never saw) that a pathologist would call clear cases.
CLEAR = {
    "Parasitized": "Parasitized/C118P79ThinF_IMG_20151002_105735_cell_153.webp",
    "Uninfected": "Uninfected/C83P44ThinF_IMG_20150817_134820_cell_100.webp",
}


@pytest.fixture(scope="module")
def client(bundled):
    settings = Settings(model=None, max_file_bytes=300_000, max_files=8, max_pixels=4_000_000)
    with TestClient(create_app(settings, bundled)) as c:
        yield c


def _png_bomb(w=50_000, h=50_000) -> bytes:
    """A ~100-byte PNG whose header declares w x h pixels."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def _healthy(client):
    r = client.get("/health")
    assert r.status_code == 200 and r.json() == {"status": "ok", "model_loaded": True}


def test_health_and_model(client):
    _healthy(client)
    m = client.get("/model").json()
    assert m["arch"] == "efficientnet_lite0" and m["input_size"] > 0 and 0 < m["threshold"] < 1
    assert m["temperature"] > 0 and m["test_metrics"]["accuracy"] > 0.9
    assert "not a diagnosis" in m["intended_use"]
    assert client.get("/openapi.json").json()["paths"]["/predict"]


def test_clear_cells_get_the_right_label_with_heatmaps(client, samples):
    files = [("files", (p.split("/")[-1], (samples / p).read_bytes(), "image/webp")) for p in CLEAR.values()]
    r = client.post("/predict", files=files)
    assert r.status_code == 200
    out = r.json()
    assert [o["label"] for o in out] == list(CLEAR)
    assert out[0]["p_parasitized"] > 0.9 and out[1]["p_parasitized"] < 0.1
    for o in out:
        assert o["ood"] is False and o["error"] is None
        png = base64.b64decode(o["heatmap"].split(",", 1)[1])
        assert Image.open(io.BytesIO(png)).format == "PNG"


def test_bad_file_gets_its_own_error_others_still_answered(client, samples):
    good = (samples / CLEAR["Parasitized"]).read_bytes()
    png = io.BytesIO()
    Image.new("RGB", (60, 60), (180, 90, 120)).save(png, "PNG")
    files = [("files", ("good.webp", good, "image/webp")),
             ("files", ("truncated.png", png.getvalue()[: len(png.getvalue()) // 2], "image/png")),
             ("files", ("empty.png", b"", "image/png")),
             ("files", ("text.png", b"just some text", "image/png")),
             ("files", ("bomb.png", _png_bomb(), "image/png")),
             ("files", ("notes.txt", b"hello", "text/plain"))]
    r = client.post("/predict", files=files)
    assert r.status_code == 200
    out = {o["filename"]: o for o in r.json()}
    assert [o["filename"] for o in r.json()] == [f[1][0] for f in files]  # upload order kept
    assert out["good.webp"]["label"] == "Parasitized" and out["good.webp"]["error"] is None
    assert "decode" in out["truncated.png"]["error"] or "cannot" in out["truncated.png"]["error"]
    assert out["empty.png"]["error"] == "empty file (0 bytes)"
    assert "not an image" in out["text.png"]["error"]
    assert "too large" in out["bomb.png"]["error"]
    assert "unsupported file type" in out["notes.txt"]["error"]
    _healthy(client)


def test_pixel_bomb_is_refused_without_allocating(client):
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    r = client.post("/predict", files=[("files", ("bomb.png", _png_bomb(), "image/png"))])
    assert r.status_code == 200 and "too large" in r.json()[0]["error"] and "50000x50000" in r.json()[0]["error"]
    # 50,000 x 50,000 RGB would be 7.5 GB; peak memory must not grow by anything like that
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000  # KiB
    _healthy(client)


def test_whole_request_errors(client, samples):
    good = (samples / CLEAR["Uninfected"]).read_bytes()
    r = client.post("/predict", files=[("files", ("a.txt", b"hello", "text/plain"))])
    assert r.status_code == 415 and "unsupported file type" in r.json()["detail"]
    r = client.post("/predict", files=[("files", (f"{i}.webp", good, "image/webp")) for i in range(9)])
    assert r.status_code == 413 and "too many files" in r.json()["detail"]
    r = client.post("/predict", files=[("files", ("big.png", b"\x89PNG" + b"0" * 400_000, "image/png"))])
    assert r.status_code == 413 and "too large" in r.json()["detail"]
    r = client.post("/predict", content=b"x" * 5_000_000, headers={"content-type": "multipart/form-data; boundary=x"})
    assert r.status_code == 413
    r = client.post("/predict", data={"nothing": "here"})
    assert r.status_code == 422
    r = client.post("/predict", content=b"garbage", headers={"content-type": "application/json"})
    assert r.status_code == 422
    _healthy(client)


def test_concurrent_requests_are_safe(client, samples):
    from concurrent.futures import ThreadPoolExecutor

    blob = (samples / CLEAR["Parasitized"]).read_bytes()

    def one(_):
        r = client.post("/predict", files=[("files", ("c.webp", blob, "image/webp"))])
        return r.status_code, r.json()[0]["p_parasitized"]

    with ThreadPoolExecutor(8) as ex:
        results = list(ex.map(one, range(32)))
    assert {s for s, _ in results} == {200}
    assert max(p for _, p in results) - min(p for _, p in results) < 1e-6


def test_page_is_self_contained(client):
    html = client.get("/").text
    assert "not a diagnosis" in html and 'type="file"' in html and "multiple" in html
    assert "http://" not in html and "https://" not in html  # no CDN, fonts or scripts from elsewhere
    js = client.get("/static/app.js").text
    assert "/predict" in js and "https://" not in js
    assert client.get("/static/style.css").status_code == 200


def test_settings_from_environment(monkeypatch):
    monkeypatch.setenv("MALARIA_DETECT_MAX_FILES", "3")
    monkeypatch.setenv("MALARIA_DETECT_MAX_FILE_BYTES", "1234")
    s = Settings()
    assert s.max_files == 3 and s.max_file_bytes == 1234


@pytest.mark.parametrize("value, on", [("false", False), ("0", False), ("no", False), ("true", True), ("1", True)])
def test_heatmaps_setting_from_the_environment(monkeypatch, bundled, samples, value, on):
    monkeypatch.setenv("MALARIA_DETECT_HEATMAPS", value)
    s = Settings()
    assert s.heatmaps is on
    if value in ("false", "true"):
        blob = (samples / CLEAR["Parasitized"]).read_bytes()
        with TestClient(create_app(s, bundled)) as c:
            out = c.post("/predict", files=[("files", ("a.webp", blob, "image/webp"))]).json()[0]
        assert (out["heatmap"] is not None) is on and out["label"] == "Parasitized"


def test_bad_settings_name_the_variable_in_one_line(monkeypatch):
    from malaria_detect.serve.app import SettingsError

    monkeypatch.setenv("MALARIA_DETECT_HEATMAPS", "maybe")
    with pytest.raises(SettingsError, match="^MALARIA_DETECT_HEATMAPS must be 1 or 0"):
        Settings()
    monkeypatch.delenv("MALARIA_DETECT_HEATMAPS")
    monkeypatch.setenv("MALARIA_DETECT_MAX_FIELD_PIXELS", "1e6")
    with pytest.raises(SettingsError, match="^MALARIA_DETECT_MAX_FIELD_PIXELS must be a whole number") as e:
        Settings()
    assert "\n" not in str(e.value)
    monkeypatch.delenv("MALARIA_DETECT_MAX_FIELD_PIXELS")
    with pytest.raises(SettingsError, match="^max_files must be a whole number"):
        Settings(max_files=True)  # a constructor argument is named as such


def test_the_server_reports_the_package_version(client):
    import malaria_detect

    assert client.get("/openapi.json").json()["info"]["version"] == malaria_detect.__version__

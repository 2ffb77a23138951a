"""REST API with FastAPI's TestClient on real sample cells and on malformed uploads."""

from __future__ import annotations

import base64
import io
import struct
import zlib
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from malaria_detect.serve.app import Settings, create_app

SAMPLES_ROOT = Path(__file__).resolve().parents[1] / "samples"

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


# ---------------------------------------------------------------- the one upload reader (/predict, /smear)
def _small_png(colour=(200, 120, 140), size=64) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def tight(bundled):
    """Small limits for both routes: 2 files of 5,000 bytes (/predict), 2 fields of 6,000 bytes (/smear)."""
    s = Settings(model=None, max_files=2, max_file_bytes=5_000, max_fields=2, max_field_bytes=6_000)
    with TestClient(create_app(s, bundled)) as c:
        yield c


@pytest.mark.parametrize("route, limit", [("/predict", 5_000), ("/smear", 6_000)])
def test_upload_reader_limits_are_the_same_for_cells_and_fields(tight, route, limit):
    small = _small_png()
    big = b"\x89PNG" + b"0" * (limit + 1)
    r = tight.post(route, files=[("files", ("ok.png", small, "image/png")), ("files", ("huge.png", big, "image/png"))])
    assert r.status_code == 413 and r.json()["detail"] == f"huge.png: file too large (limit {limit:,} bytes)"
    # exactly at the limit is fine
    at = tight.post(route, files=[("files", ("at.png", small + b"\0" * (limit - len(small)), "image/png"))])
    assert at.status_code == 200, at.text
    r = tight.post(route, files=[("files", (f"{i}.png", small, "image/png")) for i in range(3)])
    assert r.status_code == 413 and r.json()["detail"].startswith("too many ") and "(limit 2 per request)" in \
        r.json()["detail"]
    r = tight.post(route, files=[("files", ("a.txt", b"hello", "text/plain"))])
    assert r.status_code == 415 and r.json()["detail"].startswith("unsupported file type (text/plain); send ")
    # a file of another type beside an image: its own error, the image is still answered
    r = tight.post(route, files=[("files", ("notes.txt", b"hello", "text/plain")), ("files", ("ok.png", small, "image/png"))])
    assert r.status_code == 200, r.text
    answers = r.json() if route == "/predict" else r.json()["fields"]
    assert [a.get("filename", a.get("image")) for a in answers] == ["notes.txt", "ok.png"]
    assert answers[0]["error"] == "unsupported file type 'text/plain'"
    assert not answers[1].get("error")


def test_upload_reader_unit(tight):
    """read_uploads itself: one Upload per file in upload order; the type rule by content type or name."""
    import asyncio

    from fastapi import HTTPException, UploadFile
    from starlette.datastructures import Headers

    from malaria_detect.serve.uploads import read_uploads, supported

    def up(name, data, ctype):
        return UploadFile(io.BytesIO(data), filename=name, headers=Headers({"content-type": ctype}))

    files = [up("a.png", b"12", "image/png"), up("b.txt", b"x", "text/plain"), up(None, b"345", "image/jpeg"),
             up("c.tif", b"6", "application/octet-stream")]
    got = asyncio.run(read_uploads(files, max_files=4, max_bytes=3))
    assert [(u.name, u.data, u.error) for u in got] == [
        ("a.png", b"12", None), ("b.txt", b"", "unsupported file type 'text/plain'"), ("file2", b"345", None),
        ("c.tif", b"6", None)]
    assert not supported(up("d.txt", b"", "application/octet-stream"))
    with pytest.raises(HTTPException) as e:
        asyncio.run(read_uploads([up("x.png", b"1234", "image/png")], max_files=1, max_bytes=3, what="fields"))
    assert e.value.status_code == 413 and e.value.detail == "x.png: file too large (limit 3 bytes)"


# ---------------------------------------------------------------- POST /summary
def test_summary_of_cells_is_the_counting_rule(client, bundled):
    from malaria_detect.counting import Counts, ImageSummary, wilson

    answers = [{"label": "Parasitized", "ood": False}, {"label": "Uninfected", "ood": False},
               {"label": "Uninfected", "ood": None}, {"label": "Parasitized", "ood": True},
               {"label": None, "error": "not an image"}, {"label": "Parasitized", "ood": False, "error": True},
               {"filename": "x.webp", "label": "Parasitized", "p_parasitized": 0.99, "ood": False, "heatmap": None}]
    r = client.post("/summary", json={"cells": answers})
    assert r.status_code == 200, r.text
    assert r.json()["fields"] is None
    s = r.json()["cells"]
    assert s == {"images": 7, "Parasitized": 2, "Uninfected": 2, "parasitized_fraction": 0.5, "not_a_cell": 1,
                 "errors": 2, "classified": 4, "parasitized_fraction_ci95": pytest.approx(wilson(2, 4))}
    rule = ImageSummary(Counts.of([(None if a.get("error") else a["label"], a.get("ood")) for a in answers],
                                  "Parasitized"), "Parasitized", "Uninfected")
    assert {k: s[k] for k in rule.to_dict()} == rule.to_dict()
    # the answers of /predict, sent as they came
    files = [("files", (p.split("/")[-1], (SAMPLES_ROOT / p).read_bytes(), "image/webp")) for p in CLEAR.values()]
    out = client.post("/predict", files=files).json()
    s = client.post("/summary", json={"cells": out}).json()["cells"]
    assert (s["images"], s["classified"], s["Parasitized"], s["parasitized_fraction"]) == (2, 2, 1, 0.5)
    empty = client.post("/summary", json={"cells": []}).json()["cells"]
    assert empty["images"] == 0 and empty["parasitized_fraction"] is None and empty["parasitized_fraction_ci95"] is None


def test_summary_of_fields_pools_counts_with_the_who_note(client):
    from malaria_detect.counting import Summary

    recs = [{"n_cells": 7, "n_classified": 5, "n_parasitized": 3, "n_not_a_cell": 1, "n_unclassified": 1},
            {"n_cells": 40, "n_classified": 40, "n_parasitized": 0, "n_not_a_cell": 0, "n_unclassified": 0},
            {"error": "not an image"}]
    s = client.post("/summary", json={"fields": recs}).json()["fields"]
    want = Summary.of([r if "error" not in r else {"n_cells": 0, "n_classified": 0, "n_parasitized": 0,
                                                     "n_not_a_cell": 0, "n_unclassified": 0, "error": "x"}
                       for r in recs]).to_dict()
    assert s == want | {"n_analysed": 2}
    assert (s["n_cells"], s["n_classified"], s["n_parasitized"], s["n_fields"], s["n_errors"]) == (47, 45, 3, 3, 1)
    assert "only 45 red cells classified: WHO" in s["note"] and s["parasitemia"] == pytest.approx(3 / 45)
    none = client.post("/summary", json={"fields": [{"n_cells": 2, "n_not_a_cell": 2}]}).json()["fields"]
    assert none["parasitemia"] is None and "all 2 cells found were flagged" in none["note"]
    both = client.post("/summary", json={"fields": recs, "cells": [{"label": "Uninfected"}]}).json()
    assert both["fields"] == s and both["cells"]["images"] == 1
    assert client.post("/summary", json={}).json() == {"fields": None, "cells": None}


def test_summary_is_bounded_and_refuses_counts_that_do_not_add_up(client):
    from malaria_detect.serve.summary import MAX_SUMMARY_BYTES, MAX_SUMMARY_ENTRIES

    r = client.post("/summary", json={"cells": [{}] * (MAX_SUMMARY_ENTRIES + 1)})
    assert r.status_code == 413
    assert r.json() == {"detail": f"too many entries in cells: {MAX_SUMMARY_ENTRIES + 1:,} "
                                  f"(limit {MAX_SUMMARY_ENTRIES:,} per request)"}  # the list is not echoed back
    assert client.post("/summary", json={"cells": [{}] * MAX_SUMMARY_ENTRIES}).status_code == 200
    r = client.post("/summary", json={"fields": [{}] * (MAX_SUMMARY_ENTRIES + 1)})
    assert r.status_code == 413 and "fields" in r.json()["detail"]
    r = client.post("/summary", content=b" " * (MAX_SUMMARY_BYTES + 1), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "too large" in r.json()["detail"]
    for bad in ({"fields": [{"n_cells": 1, "n_classified": 1, "n_parasitized": 2}]},
                {"fields": [{"n_cells": 3, "n_classified": 1}]},
                {"fields": [{"n_cells": -1}]},
                {"fields": [{"n_cells": 10**12, "n_classified": 10**12}]},
                {"cells": [{"label": "Malaria"}]},
                {"cells": {"label": "Parasitized"}},
                {"cells": [{"ood": "sometimes"}]}):
        r = client.post("/summary", json=bad)
        assert r.status_code == 422, (bad, r.text)
    assert client.post("/summary", content=b"garbage", headers={"content-type": "application/json"}).status_code == 422
    _healthy(client)


def test_summary_is_in_the_openapi_schema_and_the_model_names_the_csv_columns(client):
    api = client.get("/openapi.json").json()
    post = api["paths"]["/summary"]["post"]
    assert post["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/SummaryIn")
    assert post["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/SummaryOut")
    assert {"413", "422"} <= set(post["responses"])
    schemas = api["components"]["schemas"]
    assert {"n_cells", "n_classified", "n_parasitized", "n_not_a_cell", "n_unclassified"} <= set(
        schemas["FieldCounts"]["properties"])
    assert schemas["SummaryIn"]["properties"]["cells"]["anyOf"][0]["maxItems"] > 0
    m = client.get("/model").json()
    from malaria_detect.cells.predictor import OBJECT_CSV_FIELDS

    # the default model has object heads: a cell's kind and stage are columns too
    assert m["csv_columns"]["cells"] == OBJECT_CSV_FIELDS
    assert OBJECT_CSV_FIELDS[:4] == ["path", "label", "p_parasitized", "ood"] and "stage" in OBJECT_CSV_FIELDS
    from malaria_detect.fields.report import CSV_FIELDS

    assert m["csv_columns"]["fields"] == CSV_FIELDS
    assert m["limits"]["max_summary_entries"] > 0 and m["limits"]["max_summary_bytes"] > 0


def test_app_module_keeps_its_names():
    """The CLI and the tests import these from serve.app; create_app is short wiring."""
    import inspect

    from malaria_detect.serve import app

    for name in ("Settings", "SettingsError", "create_app", "STATIC", "run", "parse_hosts"):
        assert hasattr(app, name), name
    assert len(inspect.getsource(app.create_app).splitlines()) < 45

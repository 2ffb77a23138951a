"""POST /smear (whole fields) with FastAPI's TestClient: the answer's shape, answers by upload
position, a bad file among good ones, the overlay only when asked, and the request limits.

Written to hold for any bundled model: the counts are checked against the cells of the answer,
never against how many cells a given model calls parasitized."""

from __future__ import annotations

import base64
import io
import re

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from malaria_detect.counting import WHO_MIN_CELLS, wilson
from malaria_detect.serve.app import STATIC, Settings, create_app

FIELD = "fields/PA171771.JPG"
FIELD_KEYS = {"image", "width", "height", "cells", "n_cells", "n_classified", "n_parasitized", "n_not_a_cell",
              "n_unclassified", "parasitemia", "parasitemia_ci95"}
CELL_KEYS = {"box", "label", "p_parasitized", "ood", "border"}
COUNT_KEYS = ["n_cells", "n_classified", "n_parasitized", "n_not_a_cell", "n_unclassified", "n_white_cells",
              "n_platelets", "n_by_stage"]


@pytest.fixture(scope="module")
def client(bundled):
    with TestClient(create_app(Settings(model=None), bundled)) as c:
        yield c


@pytest.fixture(scope="module")
def field_bytes(samples) -> bytes:
    return (samples / FIELD).read_bytes()


@pytest.fixture(scope="module")
def small_field(field_bytes) -> bytes:
    """A 480 x 360 corner of a real field (a few dozen cells): quick to analyse."""
    buf = io.BytesIO()
    Image.open(io.BytesIO(field_bytes)).crop((0, 0, 480, 360)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def mixed(client, field_bytes, small_field):
    """A whole field, a non-image sent as PNG, a small field and a text file: one request."""
    files = [("files", ("PA171771.JPG", field_bytes, "image/jpeg")),
             ("files", ("broken.png", b"this is not an image", "image/png")),
             ("files", ("corner.png", small_field, "image/png")),
             ("files", ("notes.txt", b"hello", "text/plain"))]
    r = client.post("/smear", files=files)
    assert r.status_code == 200, r.text
    return r.json()


def _check_counts(rec: dict, class_names: list[str]) -> None:
    cells = [c for c in rec["cells"] if c.get("kind", "red cell") == "red cell"]  # only red cells are counted
    ok = [c for c in cells if c["label"] is not None and not c["ood"]]
    k = sum(c["label"] == class_names[1] for c in ok)
    assert rec["n_cells"] == len(cells)
    assert rec["n_classified"] == len(ok) and rec["n_parasitized"] == k
    assert rec["n_not_a_cell"] == sum(c["ood"] for c in cells)
    assert rec["n_unclassified"] == sum(c["label"] is None for c in cells)
    if ok:
        assert rec["parasitemia"] == pytest.approx(k / len(ok))
        lo, hi = rec["parasitemia_ci95"]
        assert 0 <= lo <= rec["parasitemia"] <= hi <= 1
        assert [lo, hi] == pytest.approx(wilson(k, len(ok)))
    else:
        assert rec["parasitemia"] is None and rec["parasitemia_ci95"] is None


def test_answer_schema_and_counts(client, mixed):
    class_names = client.get("/model").json()["class_names"]
    assert set(mixed) == {"fields", "summary", "samples"}
    whole = mixed["fields"][0]
    assert FIELD_KEYS <= set(whole) and "error" not in whole and "overlay" not in whole  # no overlay unless asked
    assert (whole["width"], whole["height"]) == (1280, 960)
    assert whole["n_cells"] > 50 and whole["cell_diameter_px"] > 20
    for c in whole["cells"]:
        assert set(c) - {"kind", "stage", "p_stage", "p_cell_head"} == CELL_KEYS
        assert c.get("kind", "red cell") in ("red cell", "white cell", "platelet", "other")
        assert ("stage" in c) == (c["label"] == "Parasitized" and "kind" in c)  # the any-lab model names stages
        x0, y0, x1, y1 = c["box"]
        assert all(isinstance(v, int) for v in c["box"])
        assert 0 <= x0 < x1 <= whole["width"] and 0 <= y0 < y1 <= whole["height"]
        assert isinstance(c["ood"], bool) and isinstance(c["border"], bool)
        if c["label"] is None:
            assert c["p_parasitized"] is None
        else:
            assert c["label"] in class_names and 0 <= c["p_parasitized"] <= 1
    for rec in mixed["fields"]:
        _check_counts(rec, class_names)


def test_fields_answer_by_upload_position_and_a_bad_file_gets_its_own_error(mixed):
    names = [f["image"] for f in mixed["fields"]]
    assert names == ["PA171771.JPG", "broken.png", "corner.png", "notes.txt"]
    whole, broken, corner, text = mixed["fields"]
    assert "not an image" in broken["error"] and broken["cells"] == [] and broken["n_cells"] == 0
    assert "unsupported file type" in text["error"] and text["cells"] == []
    assert "error" not in corner and (corner["width"], corner["height"]) == (480, 360) and corner["n_cells"] > 5
    assert whole["n_cells"] > corner["n_cells"]


def test_summary_pools_the_fields(mixed):
    s, fields = mixed["summary"], mixed["fields"]
    assert s["n_fields"] == 4 and s["n_errors"] == 2
    for k in COUNT_KEYS[:-1]:
        assert s[k] == sum(f.get(k, 0) for f in fields), k
    stages = [(k, n) for f in fields for k, n in f.get("n_by_stage", {}).items()]
    assert s["n_by_stage"] == {k: sum(n for kk, n in stages if kk == k) for k, _ in stages}
    if s["n_classified"]:
        assert s["parasitemia"] == pytest.approx(s["n_parasitized"] / s["n_classified"])
        assert s["parasitemia_ci95"] == pytest.approx(wilson(s["n_parasitized"], s["n_classified"]))
    else:
        assert s["parasitemia"] is None and "no red cell could be classified" in s["note"]
    if 0 < s["n_classified"] < WHO_MIN_CELLS:
        assert "WHO" in s["note"]


def test_overlay_only_when_asked(client, small_field):
    files = [("files", ("corner.png", small_field, "image/png"))]
    plain = client.post("/smear", files=files).json()["fields"][0]
    assert "overlay" not in plain
    rec = client.post("/smear?overlay=true", files=files).json()["fields"][0]
    url = rec["overlay"]
    assert url.startswith("data:image/jpeg;base64,")
    ov = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert ov.format == "JPEG" and ov.width == rec["width"]
    assert 20 <= ov.height - rec["height"] <= 80  # the header band with the counts on top
    assert rec["cells"] == plain["cells"]  # drawing the overlay changes nothing else


def test_too_many_fields_413(bundled, small_field):
    with TestClient(create_app(Settings(model=None, max_fields=1), bundled)) as c:
        assert c.get("/model").json()["limits"]["max_fields"] == 1
        files = [("files", (f"f{i}.png", small_field, "image/png")) for i in range(2)]
        r = c.post("/smear", files=files)
        assert r.status_code == 413 and "too many fields" in r.json()["detail"]
        assert c.post("/smear", files=files[:1]).status_code == 200


def test_field_too_large_413(bundled, small_field):
    with TestClient(create_app(Settings(model=None, max_field_bytes=1000), bundled)) as c:
        r = c.post("/smear", files=[("files", ("corner.png", small_field, "image/png"))])
        assert r.status_code == 413 and "too large" in r.json()["detail"]


def test_no_image_415_and_no_files_422(client):
    r = client.post("/smear", files=[("files", ("a.txt", b"hello", "text/plain")),
                                     ("files", ("b.csv", b"x,y", "text/csv"))])
    assert r.status_code == 415 and "unsupported file type" in r.json()["detail"]
    assert client.post("/smear").status_code == 422
    assert client.post("/smear", data={"other": "x"}).status_code == 422


def test_model_limits_for_fields(client):
    limits = client.get("/model").json()["limits"]
    assert {"max_fields", "max_field_bytes", "max_field_pixels"} <= set(limits)
    assert client.get("/openapi.json").json()["paths"]["/smear"]["post"]


def test_page_serves_the_fields_mode_and_its_examples(client):
    index = client.get("/").text
    assert '<script src="/static/fields.js"></script>' in index
    js = client.get("/static/fields.js").text
    assert "/smear" in js and "https://" not in js  # nothing from elsewhere (only the SVG namespace name)
    assert [u for u in re.findall(r"https?://[^\s\"'`]+", js) if u != "http://www.w3.org/2000/svg"] == []
    examples = re.findall(r'data-field="([^"]+)"', index)
    assert 1 <= len(examples) <= 2
    for src in examples:
        r = client.get(src)
        assert r.status_code == 200 and r.content[:3] == b"\xff\xd8\xff", src  # JPEG
        assert (STATIC / src.rsplit("/", 1)[1]).exists()


def test_page_makes_no_count():
    """The page shows the server's counts (POST /summary) and makes none: no Wilson interval, WHO
    minimum or pooled tally of its own, and no hard-coded CSV header."""
    for name in ("app.js", "fields.js"):
        js = (STATIC / name).read_text()
        for banned in ("wilson", "Math.sqrt", "WHO_MIN", f"{WHO_MIN_CELLS}-2,000", "pooledNote", "CSV_HEADER",
                       '"x0", "y0"', '"p_parasitized", "ood"'):
            assert banned not in js, (name, banned)
        assert "/summary" in js


def test_summary_of_the_fields_is_the_smear_summary(client, mixed):
    """POST /summary pools field records (here the whole records, cells and all: other keys are
    ignored) exactly as POST /smear's own summary does."""
    r = client.post("/summary", json={"fields": mixed["fields"]})
    assert r.status_code == 200, r.text
    s = r.json()["fields"]
    assert s == mixed["summary"] | {"n_analysed": 2} and r.json()["cells"] is None
    counts_only = [{k: f[k] for k in COUNT_KEYS} | ({"error": True} if "error" in f else {}) for f in mixed["fields"]]
    assert client.post("/summary", json={"fields": counts_only}).json()["fields"] == s


def test_smear_names_the_sample_of_the_fields(client, field_bytes):
    r = client.post("/smear?sample=patient-12", files=[("files", ("a.jpg", field_bytes, "image/jpeg"))])
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["fields"][0]["sample"] == "patient-12"
    assert [s["sample"] for s in body["samples"]] == ["patient-12"]
    assert body["samples"][0]["n_cells"] == body["summary"]["n_cells"] > 0

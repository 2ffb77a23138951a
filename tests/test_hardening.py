"""Issue 7 (hardening): each test reproduces one reported failure on real sample cells.

Damaged models and records, answers keyed by upload position, unsupported formats, huge images,
chunked uploads, 16-bit images, EXIF orientation, CLI edges, CSV formulas, Host allow-list.
"""

from __future__ import annotations

import asyncio
import base64
import csv
import io
import json
import math
import os
import shutil
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from malaria_detect import data as D
from malaria_detect import modelfile as P
from malaria_detect.cells.predictor import Predictor
from malaria_detect.cli import main
from malaria_detect.imaging import MAX_SIDE, ImageError, open_rgb
from malaria_detect.record import Record, RecordError
from malaria_detect.serve.app import Settings, SettingsError, create_app

PAR = "Parasitized/C118P79ThinF_IMG_20151002_105735_cell_153.webp"    # clear cases (see test_serve)
UNI = "Uninfected/C83P44ThinF_IMG_20150817_134820_cell_100.webp"
TALL = "Parasitized/C127P88ThinF_IMG_20151004_112126_cell_107.webp"  # 121 x 154


def _png(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG", **kw)
    return buf.getvalue()


def _dds() -> bytes:
    """A 128-byte DDS file whose pixel format has no flags (Pillow: 'Unknown pixel format flags 0')."""
    header = struct.pack("<7I", 124, 0x1007, 64, 64, 0, 0, 0) + b"\0" * 44
    blob = b"DDS " + header + struct.pack("<8I", 32, 0, 0, 0, 0, 0, 0, 0) + struct.pack("<5I", 0x1000, 0, 0, 0, 0)
    assert len(blob) == 128
    return blob


def _client(pred, **limits):
    s = Settings(model=None, **{"max_file_bytes": 300_000, "max_files": 8, **limits})
    return TestClient(create_app(s, pred))


def _post(client, files):
    return client.post("/predict", files=[("files", f) for f in files])


# ---------------------------------------------------------------- 1. damaged models and records

@pytest.fixture(scope="module")
def onnx_model():
    return pytest.importorskip("onnx").load(str(P.bundled_model_path()))


def _save_with_record(onnx_model, path: Path, **changes) -> Path:
    """A copy of the bundled model whose stored record has `changes` (no weights hash)."""
    m = type(onnx_model)()
    m.CopyFrom(onnx_model)
    for prop in m.metadata_props:
        if prop.key == "malaria_detect_record":
            d = json.loads(prop.value)
            d.update(changes)
            prop.value = json.dumps(d)
    pytest.importorskip("onnx").save(m, str(path))
    return path


def _nan_model(onnx_model, path: Path) -> Path:
    """The bundled model with its largest weight tensor overwritten by NaNs (0xFF bytes), stamped with
    the hash of those weights: a model exported with NaN weights (a merely damaged copy is refused at
    load by its weights hash, tests/test_hardening2.py)."""
    big = max(onnx_model.graph.initializer, key=lambda t: len(t.raw_data)).raw_data
    blob = bytearray(P.bundled_model_path().read_bytes())
    at = bytes(blob).find(big)
    assert at > 0
    blob[at:at + len(big)] = b"\xff" * len(big)
    path.write_bytes(blob)
    P.write_model_record(path, Record.from_json(P.read_metadata(path)["malaria_detect_record"]))
    return path


def test_nan_output_is_an_error_never_a_label(onnx_model, tmp_path, samples, capsys):
    bad = _nan_model(onnx_model, tmp_path / "bad.onnx")
    pred = Predictor.load(bad)
    res = pred.predict([samples / PAR, samples / UNI], heatmaps=True)
    assert all(r.label is None and r.p_parasitized is None and "not a finite number" in r.error for r in res)
    assert main(["predict", str(samples / PAR), "--model", str(bad)]) == 1  # no answer for the input
    out = capsys.readouterr().out
    assert "ERROR the model's output is not a finite number" in out and "p=" not in out
    with _client(pred) as c:
        r = _post(c, [("a.webp", (samples / PAR).read_bytes(), "image/webp")])
    assert r.status_code == 200
    assert r.json()[0]["label"] is None and "not a finite number" in r.json()[0]["error"]
    assert main(["evaluate", "--model", str(bad), "--data", str(samples), "--split", "all", "--bootstrap", "0"]) == 1
    assert "not a finite number" in capsys.readouterr().err


@pytest.mark.parametrize("changes, words", [
    ({"std": [0, 0, 0]}, "std must be > 0"),
    ({"threshold": math.nan}, "threshold must be between 0 and 1"),
    ({"threshold": 1.0}, "threshold must be between 0 and 1"),
    ({"temperature": 0}, "temperature must be"),
    ({"input_size": 20000}, "input_size must be an integer from 16 to 1024"),
    ({"mean": [0.5, 0.5]}, "mean must be 3 finite numbers"),
    ({"class_names": ["Uninfected", "Parasitized", "Other"]}, "class_names must be 2 different names"),
    ({"ood_threshold": math.inf}, "ood_threshold must be a finite number"),
    ({"colour": "blue"}, "unknown record keys: colour"),
])
def test_invalid_record_is_refused_at_load_with_one_line(onnx_model, bundled, tmp_path, samples, capsys,
                                                         changes, words):
    d = json.loads(bundled.record.to_json()) | changes
    with pytest.raises(RecordError, match=words):
        Record.from_json(json.dumps(d))
    bad = _save_with_record(onnx_model, tmp_path / "bad.onnx", **changes)
    with pytest.raises(RecordError, match=f"{bad}: invalid model record: {words}"):
        Predictor.load(bad)
    assert main(["predict", str(samples / PAR), "--model", str(bad)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(bad) in err and words in err and "Traceback" not in err


def test_bundled_model_matches_its_sha256_file_and_a_damaged_copy_is_refused(tmp_path, monkeypatch):
    import hashlib

    want = P.bundled_sha256_path().read_text().split()
    assert want[1] == P.BUNDLED_MODEL and want[0] == hashlib.sha256(P.bundled_model_path().read_bytes()).hexdigest()
    # a damaged bundled model (simulated in a copy of the assets folder) is refused at load
    assets = tmp_path / "assets"
    shutil.copytree(P.bundled_model_path().parent, assets)
    blob = bytearray((assets / P.BUNDLED_MODEL).read_bytes())
    rng = np.random.default_rng(0)
    for i in rng.choice(np.arange(len(blob) // 4, len(blob) // 2), 2000, replace=False):  # in the weights
        blob[i] = int(rng.integers(256))
    (assets / P.BUNDLED_MODEL).write_bytes(blob)
    monkeypatch.setattr(P, "bundled_model_path", lambda: assets / P.BUNDLED_MODEL)
    with pytest.raises(P.ModelError, match=f"does not match {P.BUNDLED_MODEL}.sha256"):
        Predictor.load()


def test_weights_hash_in_metadata_catches_flipped_bytes(onnx_model, tmp_path):
    pytest.importorskip("torch")  # export.write_metadata lives with the training extras
    from malaria_detect.training.export import write_metadata

    good = tmp_path / "good.onnx"
    shutil.copy(P.bundled_model_path(), good)
    write_metadata(good, Predictor.load().record)
    assert P.WEIGHTS_KEY in Predictor.load(good).session.get_modelmeta().custom_metadata_map
    big = max(onnx_model.graph.initializer, key=lambda t: len(t.raw_data)).raw_data
    blob = bytearray(good.read_bytes())
    at = bytes(blob).find(big)
    rng = np.random.default_rng(1)
    for i in rng.choice(len(big), 2000, replace=False):
        blob[at + i] = int(rng.integers(256))
    bad = tmp_path / "flipped.onnx"
    bad.write_bytes(blob)
    with pytest.raises(P.ModelError, match=f"{bad}: its weights do not match the hash"):
        Predictor.load(bad)


# ---------------------------------------------------------------- 2. answers by upload position

def test_answers_stay_with_their_own_file_when_names_repeat(bundled, samples):
    files = [("a.png", (samples / PAR).read_bytes(), "image/png"),
             ("a.png (2)", b"not an image at all", "image/png"),
             ("a.png", (samples / UNI).read_bytes(), "image/png")]
    with _client(bundled) as c:
        out = _post(c, files).json()
    assert [o["filename"] for o in out] == ["a.png", "a.png (2)", "a.png"]
    assert [o["label"] for o in out] == ["Parasitized", None, "Uninfected"]
    assert "not an image" in out[1]["error"] and out[0]["error"] is None and out[2]["error"] is None
    assert out[0]["p_parasitized"] > 0.9 > 0.1 > out[2]["p_parasitized"]


# ---------------------------------------------------------------- 3. unsupported formats

def test_dds_upload_gets_its_own_error_beside_a_good_cell(bundled, samples):
    with _client(bundled) as c:
        r = _post(c, [("odd.png", _dds(), "image/png"), ("cell.webp", (samples / PAR).read_bytes(), "image/webp")])
    assert r.status_code == 200
    assert "not an image in a supported format" in r.json()[0]["error"]
    assert r.json()[1]["label"] == "Parasitized"


def test_dds_in_a_data_folder_is_skipped_by_check_data_evaluate_and_training_loader(samples, tmp_path, capsys):
    for cls, rel in (("Parasitized", PAR), ("Uninfected", UNI)):
        (tmp_path / cls).mkdir()
        shutil.copy(samples / rel, tmp_path / rel)
    dds = tmp_path / "Uninfected" / "C83P44ThinF_odd.png"
    dds.write_bytes(_dds())
    items = D.find_images(tmp_path)
    x, y, kept, errors = D.load_arrays(items, 64, use_cache=False, progress=False)  # train/evaluate/export
    assert len(x) == 2 and [e[0] for e in errors] == [dds] and "supported format" in errors[0][1]
    assert main(["check-data", str(tmp_path), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert [u["file"] for u in r["unreadable"]] == [str(dds)]
    assert main(["evaluate", "--data", str(tmp_path), "--split", "all", "--bootstrap", "0", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n_images"] == 2


# ---------------------------------------------------------------- 4. huge images, small uploads

def _solid(w=3999, h=4000) -> bytes:
    return _png(Image.new("RGB", (w, h), (200, 120, 150)))


def test_images_are_shrunk_right_after_decoding(samples):
    img = open_rgb(_solid())
    assert max(img.size) == MAX_SIDE and img.size == (512, 512)
    cell = open_rgb(samples / PAR)  # cells (~130 px) are left as they are
    assert cell.size == Image.open(samples / PAR).size
    assert max(open_rgb(_solid(6000, 500)).size) == MAX_SIDE


def test_request_pixel_budget_and_lower_single_cell_limit(bundled, samples):
    assert Settings().max_pixels == 4_000_000  # default per image: cells, not whole fields
    big = _solid(2000, 1500)  # 3 M pixels each
    with _client(bundled, max_pixels=4_000_000, max_request_pixels=7_000_000) as c:
        out = _post(c, [(f"{i}.png", big, "image/png") for i in range(3)]
                    + [("cell.webp", (samples / PAR).read_bytes(), "image/webp")]).json()
    assert [o["error"] is None for o in out] == [True, True, False, True]
    assert "pixel budget" in out[2]["error"] and out[3]["label"] == "Parasitized"
    for o in out[:2]:  # heatmaps stay small
        png = Image.open(io.BytesIO(base64.b64decode(o["heatmap"].split(",", 1)[1])))
        assert max(png.size) <= 512


def test_big_upload_memory_is_bounded_and_returned(tmp_path):
    """Eight solid 3999x4000 PNGs (50 KB each) in one request, in a fresh server process: peak
    memory, answer size and the memory still held afterwards stay small."""
    code = textwrap.dedent("""
        import io, json, sys
        from PIL import Image
        from fastapi.testclient import TestClient
        from malaria_detect.serve.app import Settings, create_app

        def rss(field):
            for line in open("/proc/self/status"):
                if line.startswith(field):
                    return int(line.split()[1]) // 1024
        buf = io.BytesIO()
        Image.new("RGB", (3999, 4000), (200, 120, 150)).save(buf, "PNG")
        files = [("files", (f"{i}.png", buf.getvalue(), "image/png")) for i in range(8)]
        s = Settings(model=None, max_pixels=16_000_000, max_request_pixels=10**9)
        with TestClient(create_app(s)) as c:
            c.post("/predict", files=files[:1])
            before = rss("VmRSS")
            r = c.post("/predict", files=files)
            print(json.dumps({"status": r.status_code, "bytes": len(r.content), "before": before,
                              "after": rss("VmRSS"), "peak": rss("VmHWM"),
                              "errors": sum(bool(o["error"]) for o in r.json())}))
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout.strip().splitlines()[-1])
    assert m["status"] == 200 and m["errors"] == 0
    assert m["bytes"] < 200_000, m     # was 2.3 MB: heatmaps at 3999x4000
    assert m["peak"] < 700, m          # MB; was > 1.5 GB
    assert m["after"] - m["before"] < 150, m


# ---------------------------------------------------------------- 5. chunked uploads

def test_chunked_upload_is_stopped_at_the_cap(bundled):
    """A 300 MB body with no Content-Length, fed to the app chunk by chunk as a server would."""
    app = create_app(Settings(model=None, max_file_bytes=300_000, max_files=8), bundled)
    cap = app.state.settings.max_request_bytes
    chunk, total, sent, out = 2**20, 300 * 2**20, [0], []
    head = (b'--x\r\nContent-Disposition: form-data; name="files"; filename="big.png"\r\n'
            b"Content-Type: image/png\r\n\r\n")

    async def receive():
        if sent[0] >= total:
            return {"type": "http.disconnect"}
        body = (head if not sent[0] else b"") + b"x" * chunk
        sent[0] += chunk
        return {"type": "http.request", "body": body, "more_body": sent[0] < total}

    async def send(message):
        out.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": "/predict", "raw_path": b"/predict", "query_string": b"",
             "root_path": "", "client": ("127.0.0.1", 1), "server": ("testserver", 80),
             "headers": [(b"host", b"testserver"), (b"content-type", b"multipart/form-data; boundary=x"),
                         (b"transfer-encoding", b"chunked")]}
    asyncio.run(app(scope, receive, send))
    start = next(m for m in out if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in out if m["type"] == "http.response.body")
    assert start["status"] == 413 and "upload too large" in json.loads(body)["detail"]
    assert sent[0] <= cap + chunk  # read no further than the cap


# ---------------------------------------------------------------- 6. 16-bit images

@pytest.mark.parametrize("fmt, bits", [("PNG", 16), ("TIFF", 16), ("TIFF", 12)])
def test_16bit_greyscale_keeps_its_grey_levels(samples, tmp_path, fmt, bits):
    grey = np.asarray(Image.open(samples / PAR).convert("L"), np.uint16)
    wide = grey * ((2 ** bits - 1) // 255)
    path = tmp_path / f"cell16.{fmt.lower()}"
    Image.fromarray(wide.astype(np.uint16)).save(path, fmt)
    assert Image.open(path).mode.startswith("I")
    got = np.asarray(open_rgb(path))
    assert len(np.unique(got)) > 100  # was 2: everything over 255 clipped to white
    assert np.abs(got[..., 0].astype(int) - grey).max() <= 1 and (got[..., 0] == got[..., 2]).all()


# ---------------------------------------------------------------- 7. EXIF orientation

def test_exif_orientation_is_applied(samples, tmp_path):
    cell = Image.open(samples / TALL).convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: "rotate 90 degrees clockwise to view"
    stored = tmp_path / "rotated.png"
    cell.transpose(Image.Transpose.ROTATE_90).save(stored, exif=exif)
    got = open_rgb(stored)
    assert got.size == cell.size and np.array_equal(np.asarray(got), np.asarray(cell))


# ---------------------------------------------------------------- 8. CLI edges, settings, 422

def test_heatmaps_into_a_file_and_bad_batch_size_are_clear_errors(samples, tmp_path, capsys):
    afile = tmp_path / "file.txt"
    afile.write_text("x")
    with pytest.raises(SystemExit, match="--heatmaps .*not a folder"):
        main(["predict", str(samples / PAR), "--heatmaps", str(afile)])
    for n in ("0", "-1", "many"):
        with pytest.raises(SystemExit) as e:
            main(["predict", str(samples / PAR), "--batch-size", n])
        assert e.value.code == 2
        assert "--batch-size" in capsys.readouterr().err


def test_csv_into_a_missing_folder_fails_before_predicting(samples, tmp_path, monkeypatch):
    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the CSV destination was checked")

    monkeypatch.setattr(Predictor, "load", no_load)
    with pytest.raises(SystemExit, match="does not exist"):
        main(["predict", str(samples / PAR), "--csv", str(tmp_path / "missing" / "out.csv")])


def test_fifo_on_the_command_line_is_skipped_not_waited_on(samples, tmp_path):
    fifo = tmp_path / "cell.png"
    os.mkfifo(fifo)
    r = subprocess.run([sys.executable, "-m", "malaria_detect.cli", "predict", str(fifo), str(samples / PAR)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stderr  # an input could not be read; the readable one still got its row
    assert "ERROR not a regular file" in r.stdout and "Parasitized" in r.stdout


@pytest.mark.parametrize("value", ["-3", "0", "ten"])
def test_bad_limit_environment_variables_are_named(monkeypatch, value):
    monkeypatch.setenv("MALARIA_DETECT_MAX_FILES", value)
    with pytest.raises(SettingsError, match="MALARIA_DETECT_MAX_FILES must be"):
        Settings()


def test_serve_with_a_bad_limit_prints_one_line(monkeypatch, capsys):
    import uvicorn

    def no_server(*a, **k):
        raise AssertionError("the server started with a negative limit")

    monkeypatch.setattr(uvicorn, "run", no_server)
    monkeypatch.setenv("MALARIA_DETECT_MAX_PIXELS", "-1")
    assert main(["serve", "--port", "1"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "MALARIA_DETECT_MAX_PIXELS must be at least 1" in err


def test_malformed_multipart_is_422_as_documented(bundled):
    with _client(bundled) as c:
        r = c.post("/predict", content=b"abc", headers={"content-type": "multipart/form-data"})  # no boundary
        assert r.status_code == 422 and "malformed request" in r.json()["detail"]  # was 400
        r = c.post("/predict", content=b"--x\r\nbroken", headers={"content-type": "multipart/form-data; boundary=x"})
        assert r.status_code == 422
    api = (Path(__file__).resolve().parents[1] / "README.md").read_text().split("## REST API")[1].split("\n## ")[0]
    assert "**422** (malformed request" in api


# ---------------------------------------------------------------- 9. CSV formulas, Host allow-list

def test_csv_cells_that_look_like_formulas_are_escaped(samples, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative paths: the path cell starts with the file name
    shutil.copy(samples / PAR, tmp_path / "=HYPERLINK(1).webp")
    (tmp_path / "@bad.png").write_bytes(b"")
    (tmp_path / "-x.png").write_bytes(b"text")
    assert main(["predict", "--csv", "out.csv", "--", "=HYPERLINK(1).webp", "@bad.png", "-x.png"]) == 1  # 2 unreadable
    header, *rows = list(csv.reader(open(tmp_path / "out.csv")))
    assert [r[0] for r in rows] == ["'=HYPERLINK(1).webp", "'@bad.png", "'-x.png"]
    assert not any(c[:1] in ("=", "+", "-", "@") for row in rows for c in row)
    assert rows[0][1] == "Parasitized" and "0 bytes" in rows[1][header.index("error")]


def test_csv_safe_prefixes_formula_starts():
    from malaria_detect.tables import csv_safe

    assert [csv_safe(v) for v in ("=1+1", "+1", "-1", "@SUM(A1)", "\t=1", "cell.png", "")] == \
        ["'=1+1", "'+1", "'-1", "'@SUM(A1)", "'\t=1", "cell.png", ""]


def test_allowed_hosts_refuse_other_host_headers(bundled, monkeypatch):
    monkeypatch.setenv("MALARIA_DETECT_ALLOWED_HOSTS", "localhost, 127.0.0.1")
    s = Settings(model=None)
    assert s.allowed_hosts == ["localhost", "127.0.0.1"]
    with TestClient(create_app(s, bundled), base_url="http://localhost:8000") as c:
        assert c.get("/health").status_code == 200
        assert c.get("/health", headers={"host": "127.0.0.1:8000"}).status_code == 200
        assert c.get("/health", headers={"host": "attacker.example"}).status_code == 400
    monkeypatch.delenv("MALARIA_DETECT_ALLOWED_HOSTS")
    assert Settings(model=None).allowed_hosts is None  # unset: run() chooses by the bind address
    with TestClient(create_app(Settings(model=None), bundled)) as c:  # create_app alone: any host
        assert c.get("/health", headers={"host": "anything.example"}).status_code == 200


def test_non_regular_and_unsupported_files_are_image_errors(tmp_path):
    with pytest.raises(ImageError, match="not a regular file"):
        open_rgb(tmp_path)
    with pytest.raises(ImageError, match="supported format"):
        open_rgb(_dds())

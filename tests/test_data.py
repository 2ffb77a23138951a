"""Data: patient ids, folder layouts, patient-disjoint splits, k-fold, check-data, download."""

from __future__ import annotations

import hashlib
import http.server
import io
import shutil
import socket
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from malaria_detect import data as D
from malaria_detect.cli import main


@pytest.mark.parametrize("name,patient", [
    ("C100P61ThinF_IMG_20150918_144104_cell_162.png", "C100P61"),
    ("C1_thinF_IMG_20150604_104722_cell_9.png", "C1"),
    ("C39P4thinF_original_IMG_20150622_105253_cell_94.png", "C39P4"),
    ("C167P128ReThinF_IMG_20151201_105102_cell_245.webp", "C167P128Re"),
    ("cell_0001.png", None),
])
def test_patient_from_nih_file_names(name, patient):
    assert D.patient_from_name(name) == patient


def test_patient_ids_match_the_manifest(nih):
    import csv

    rows = list(csv.DictReader(open(nih / "manifest.csv")))
    assert len(rows) == 21894
    assert all(D.patient_from_name(r["file"]) == r["patient"] for r in rows)


def test_find_images_on_sample(samples):
    items = D.find_images(samples)
    assert len(items) == 221 and sum(i.label for i in items) == 93
    assert all(i.patient for i in items)
    assert len({i.patient for i in items}) == 32


def _write(path: Path, color=(200, 100, 120), size=(40, 44), fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, format=fmt)


def test_folder_names_case_insensitive_and_formats(tmp_path):
    _write(tmp_path / "infected" / "C1_thinF_a.jpg")
    _write(tmp_path / "infected" / "C2_thinF_b.tif")
    _write(tmp_path / "UNINFECTED" / "C3_thinF_c.bmp")
    _write(tmp_path / "UNINFECTED" / "C3_thinF_d.webp")
    (tmp_path / "UNINFECTED" / "notes.txt").write_text("ignored")
    items = D.find_images(tmp_path)
    assert sorted((i.path.name, i.label, i.patient) for i in items) == [
        ("C1_thinF_a.jpg", 1, "C1"), ("C2_thinF_b.tif", 1, "C2"),
        ("C3_thinF_c.bmp", 0, "C3"), ("C3_thinF_d.webp", 0, "C3")]


def test_missing_class_folder_is_a_clear_error(tmp_path):
    _write(tmp_path / "Parasitized" / "C1_thinF_a.png")
    with pytest.raises(D.DataError, match="one subfolder per class"):
        D.find_images(tmp_path)


def test_no_patient_id_warns_loudly_and_csv_fixes_it(tmp_path):
    _write(tmp_path / "Parasitized" / "a.png")
    _write(tmp_path / "Uninfected" / "b.png")
    with pytest.warns(UserWarning, match="CANNOT be patient-disjoint"):
        D.find_images(tmp_path)
    csv = tmp_path / "patients.csv"
    csv.write_text("file,patient\nParasitized/a.png,P7\nb.png,P8\n")
    items = D.find_images(tmp_path, csv)
    assert {i.path.name: i.patient for i in items} == {"a.png": "P7", "b.png": "P8"}


def test_split_is_patient_disjoint_deterministic_and_stratified(nih):
    items = D.find_images(nih)
    a = D.split_patients(items, seed=0)
    b = D.split_patients(items, seed=0)
    assert a == b
    assert D.split_patients(items, seed=1) != a
    sets = [set(v) for v in a.values()]
    assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])
    assert sum(map(len, sets)) == 160
    assert [len(a["train"]), len(a["val"]), len(a["test"])] == [112, 16, 32]
    healthy = {p for p in {i.patient for i in items}
               if not any(i.label for i in items if i.patient == p)}
    assert len(healthy) == 40
    for part, frac in (("train", 0.7), ("val", 0.1), ("test", 0.2)):  # healthy-only patients in every part
        assert abs(len(healthy & set(a[part])) - 40 * frac) <= 1


def test_leakage_guard_fails_loudly():
    with pytest.raises(D.DataError, match="patient leakage: patient 'C9'"):
        D.assert_disjoint({"train": ["C1", "C9"], "val": ["C2"], "test": ["C9"]})


def test_split_file_round_trip(tmp_path, samples):
    items = D.find_images(samples)
    parts = D.split_patients(items, (0.6, 0.2, 0.2), seed=3)
    sha = D.save_split(parts, tmp_path / "split.json", seed=3)
    assert D.load_split(tmp_path / "split.json") == parts
    assert sha == D.file_sha256(tmp_path / "split.json")


def test_kfold_covers_every_patient_once(samples):
    items = D.find_images(samples)
    folds = D.kfold_patients(items, 5, seed=0)
    flat = [p for f in folds for p in f]
    assert sorted(flat) == sorted({i.patient for i in items}) and len(flat) == len(set(flat))
    assert max(map(len, folds)) - min(map(len, folds)) <= 1


def test_check_data_reports_bad_files_and_duplicates(tmp_path, samples, capsys):
    src = sorted((samples / "Parasitized").iterdir())[:2]
    for p in src:
        (tmp_path / "Parasitized").mkdir(exist_ok=True)
        shutil.copy(p, tmp_path / "Parasitized" / p.name)
    (tmp_path / "Uninfected").mkdir()
    shutil.copy(src[0], tmp_path / "Uninfected" / ("dup_" + src[0].name))  # same pixels, other label
    (tmp_path / "Uninfected" / "C5_thinF_empty.png").write_bytes(b"")
    (tmp_path / "Uninfected" / "C5_thinF_broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    r = D.check_data(tmp_path, progress=False)
    assert r["n_images"] == 5 and r["per_class"] == {"Uninfected": 3, "Parasitized": 2}
    bad = {Path(b["file"]).name: b["error"] for b in r["unreadable"]}
    assert bad.keys() == {"C5_thinF_empty.png", "C5_thinF_broken.png"}
    assert "0 bytes" in bad["C5_thinF_empty.png"]
    assert len(r["duplicate_groups"]) == 1 and len(r["duplicates_with_conflicting_labels"]) == 1
    assert main(["check-data", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "unreadable: 2" in out and "C5_thinF_broken.png" in out and "conflicting labels: 1" in out


def test_load_arrays_skips_unreadable(tmp_path, samples):
    good = sorted((samples / "Uninfected").iterdir())[0]
    bad = tmp_path / "C1_thinF_bad.png"
    bad.write_bytes(b"garbage")
    items = [D.Item(good, 0, "C1"), D.Item(bad, 1, "C1")]
    x, y, kept, errors = D.load_arrays(items, 32, use_cache=False, progress=False)
    assert x.shape == (1, 32, 32, 3) and x.dtype == np.uint8 and list(y) == [0]
    assert errors and errors[0][0] == bad


# ---------------------------------------------------------------- download (local server only)

def _zip_of_cells(samples) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for cls in ("Parasitized", "Uninfected"):
            for p in sorted((samples / cls).iterdir())[:3]:
                z.write(p, f"cell_images/{cls}/{p.name}")
        z.writestr("cell_images/Parasitized/Thumbs.db", b"junk")
    return buf.getvalue()


@pytest.fixture
def http_zip(samples):
    payload = _zip_of_cells(samples)

    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *a):
            pass

    srv = http.server.HTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/cell_images.zip", hashlib.sha256(payload).hexdigest()
    srv.shutdown()


def test_download_verifies_and_unpacks(tmp_path, http_zip):
    url, sha = http_zip
    folder = D.download(tmp_path, url, sha, progress=False)
    items = D.find_images(folder)
    assert len(items) == 6 and {i.label for i in items} == {0, 1}
    assert not list(folder.rglob("Thumbs.db"))


def test_download_checksum_mismatch(tmp_path, http_zip):
    url, _ = http_zip
    with pytest.raises(D.DataError, match="checksum mismatch"):
        D.download(tmp_path, url, "0" * 64, progress=False)
    assert not list(tmp_path.glob("*.zip*"))


def test_download_offline_is_a_clear_error_without_traceback(tmp_path, capsys):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there: connection refused, as when offline
    rc = main(["download", str(tmp_path), "--url", f"http://127.0.0.1:{port}/cell_images.zip"])
    err = capsys.readouterr().err
    assert rc == 1 and "could not download" in err and "offline" in err and "Traceback" not in err

"""Hardening 2, outside the server: small inputs must not cost gigabytes or minutes, odd fields must not
give wrong answers without a word, and the command line lists and counts each real file once."""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import malaria_detect as md
from malaria_detect.cells.heatmaps import heatmap_overlay
from malaria_detect.cells.predictor import Predictor
from malaria_detect.cli import main
from malaria_detect.errors import ModelError
from malaria_detect.fields import segment as S
from malaria_detect.fields.analysis import SmearOptions, analyze_field
from malaria_detect.fields.area import imaged_area
from malaria_detect.imaging import FIELD_MAX_PIXELS, open_rgb
from malaria_detect.modelfile import BUNDLED_NAMES, WEIGHTS_KEY, bundled_model_path, read_metadata

ROOT = Path(__file__).resolve().parents[1]
FIELDS = sorted((ROOT / "samples" / "fields").glob("*.JPG"))


@pytest.fixture(scope="module")
def robust():
    return md.load("robust")


@pytest.fixture(scope="module")
def field_rgb():
    return np.asarray(Image.open(FIELDS[0]).convert("RGB")).copy()


@pytest.fixture(scope="module")
def unmasked(robust, field_rgb):
    return analyze_field(robust, field_rgb, "field")


def _png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


# ---------------------------------------------------------------- 1. a strip is no cell; heatmaps are bounded

def test_a_strip_gets_its_own_error_and_no_huge_heatmap(bundled):
    strip = _png(np.full((10000, 1, 3), 180, np.uint8))  # a 1 x 10,000 PNG: ~100 bytes
    assert len(strip) < 1000
    r = bundled.predict(strip)
    assert r.label is None and "no photo of a single cell" in r.error
    cell = next((ROOT / "samples" / "Parasitized").iterdir())
    ok = bundled.predict([cell, strip, Image.open(cell).resize((30, 200))], heatmaps=True)
    assert ok[0].label and ok[1].error and ok[2].label  # 30 x 200 (6.7 : 1) is still taken
    for shape in ((4, 300), (300, 4), (20, 20)):  # whatever the image, the overlay stays within 512 px
        over = heatmap_overlay(Image.new("RGB", shape[::-1], (200, 120, 140)), ok[0].cam, 1.0)
        assert max(over.size) <= 512


# ---------------------------------------------------------------- 2. the work per field is bounded

def test_a_tiny_cell_diameter_on_a_large_field_is_refused_before_any_work(robust, field_rgb):
    big = np.asarray(Image.fromarray(field_rgb).resize((2400, 1800)))
    rec = analyze_field(robust, big, "big", SmearOptions(cell_diameter=6))
    assert rec["n_cells"] == 0 and rec["parasitemia"] is None
    assert "megapixels (limit 40)" in rec["note"] and "cell diameter is too small" in rec["note"]
    assert "seconds" not in rec  # nothing was segmented or classified


def test_a_field_with_too_many_objects_says_so(robust, field_rgb, monkeypatch):
    monkeypatch.setattr(S, "MAX_OBJECTS", 20)
    rec = analyze_field(robust, field_rgb, "crowded", SmearOptions(detector=None))  # the classical segmenter's bound
    assert rec["n_cells"] == 0 and "more than 20 objects" in rec["note"]


# ---------------------------------------------------------------- 5. black and white borders

def _stop(rgb: np.ndarray, radius: float) -> np.ndarray:
    """The field seen through a round field stop: black outside a circle."""
    H, W = rgb.shape[:2]
    yy, xx = np.mgrid[:H, :W]
    out = rgb.copy()
    out[(yy - H / 2) ** 2 + (xx - W / 2) ** 2 > radius ** 2] = 0
    return out


def _inside(rec, radius, H, W):
    """Cells of a record whose centre lies well inside the stop."""
    return [c for c in rec["cells"] if ((c["box"][0] + c["box"][2]) / 2 - W / 2) ** 2
            + ((c["box"][1] + c["box"][3]) / 2 - H / 2) ** 2 < (radius - 60) ** 2]


@pytest.mark.parametrize("share", [1.05, 1.15])  # 6 % and 1.4 % of the field black (corners)
def test_a_round_field_stop_keeps_the_cells_inside_it(robust, field_rgb, unmasked, share):
    H, W = field_rgb.shape[:2]
    radius = W / 2 * share
    rec = analyze_field(robust, _stop(field_rgb, radius), "stopped")
    want = _inside(unmasked, radius, H, W)
    assert len(_inside(rec, radius, H, W)) >= 0.9 * len(want)
    assert rec["parasitemia"] is not None and "note" not in rec
    assert abs(rec["n_parasitized"] - sum(c["label"] == "Parasitized" for c in want)) <= 1


def test_a_cell_mostly_hidden_by_the_field_stop_is_not_counted(field_rgb):
    """The counting-frame rule (analysis._inside_stop), on the default whole-field path: every object cut
    by the stop shows more than half a red cell's box; the red cells counted are those the unmasked field
    has with their centre inside the stop, give or take a few."""
    H, W = field_rgb.shape[:2]
    radius = 0.55 * H
    rec = analyze_field(md.load("anylab"), _stop(field_rgb, radius), FIELDS[0].name,
                        SmearOptions(detector="bundled"))
    area = imaged_area(_stop(field_rgb, radius))
    reds = [c for c in rec["cells"] if c["kind"] == "red cell"]
    med = np.median([(c["box"][2] - c["box"][0]) * (c["box"][3] - c["box"][1]) for c in reds])
    cut = [c for c in rec["cells"] if not area[c["box"][1]:c["box"][3], c["box"][0]:c["box"][2]].all()]
    assert cut and all(c["border"] and (c["box"][2] - c["box"][0]) * (c["box"][3] - c["box"][1]) > 0.5 * med
                       for c in cut)
    plain = analyze_field(md.load("anylab"), field_rgb, FIELDS[0].name, SmearOptions(detector="bundled"))
    inside = [c for c in plain["cells"] if c["kind"] == "red cell"
              and np.hypot((c["box"][0] + c["box"][2]) / 2 - W / 2, (c["box"][1] + c["box"][3]) / 2 - H / 2) < radius]
    assert abs(len(reds) - len(inside)) <= 0.06 * len(inside), (len(reds), len(inside))  # the cells behind the stop


def test_the_imaged_area_finds_black_corners_white_bands_and_transparency(field_rgb, robust):
    H, W = field_rgb.shape[:2]
    assert imaged_area(field_rgb).all()  # a plain field: all of it
    area = imaged_area(_stop(field_rgb, H / 2))
    assert 0.55 < area.mean() < 0.62  # the circle's share of a 4:3 field is pi/4 * 3/4 = 0.59
    banded = field_rgb.copy()
    banded[:, :200], banded[:80] = 255, 0
    rec = analyze_field(robust, banded, "bands")
    assert 0.7 < rec["imaged_fraction"] < 0.8 and rec["n_cells"] > 80 and "note" not in rec
    rgba = np.dstack([field_rgb, np.full((H, W), 255, np.uint8)])
    rgba[:, -150:, 3] = 0  # a transparent strip (composited onto black when decoded)
    rec = analyze_field(robust, open_rgb(_png(rgba), max_side=None), "transparent")
    assert rec["imaged_fraction"] < 0.9 and rec["n_cells"] > 100
    assert not any(c["box"][0] > W - 140 for c in rec["cells"])  # no cell in the transparent strip


def test_a_blown_out_white_background_is_the_fields_own_not_a_surround(robust, field_rgb):
    bright = np.clip(field_rgb.astype(np.int32) * 1.6, 0, 255).astype(np.uint8)  # the background reads 255
    assert np.median(bright[::8, ::8].reshape(-1, 3), axis=0).min() == 255
    rec = analyze_field(robust, bright, "bright")
    assert rec["imaged_fraction"] == 1.0 and rec["n_cells"] > 100
    assert sum(c["border"] for c in rec["cells"]) < 0.3 * len(rec["cells"])


def test_a_photo_that_shows_almost_no_smear_is_not_counted(robust, field_rgb):
    rec = analyze_field(robust, _stop(field_rgb, 90), "keyhole")
    assert rec["n_cells"] == 0 and "of the photo shows the smear" in rec["note"]


def test_a_count_implausible_for_the_field_says_so(robust, field_rgb):
    rec = analyze_field(robust, field_rgb, "wrong scale", SmearOptions(cell_diameter=400))
    assert "implausible" in rec.get("note", "")


def test_the_detectors_boxes_are_checked_as_the_segmenters_masks_are(field_rgb):
    """On the detector path: the real field's detected objects cover its stain (no note); a tenth of them
    would not (the note)."""
    from malaria_detect.fields.analysis import _objects, implausible_count
    from malaria_detect.fields.area import imaged_area
    from malaria_detect.modelfile import detector_path

    cells, d = _objects(field_rgb, SmearOptions(detector=str(detector_path("bundled"))))
    area = imaged_area(field_rgb)
    assert len(cells) > 100 and implausible_count(field_rgb, area, cells, d) is None
    note = implausible_count(field_rgb, area, cells[::10], d)
    assert note and "implausible" in note and f"the {len(cells[::10])} cells found" in note


# ---------------------------------------------------------------- 6. float TIFFs

def test_a_float_tiff_decodes():
    a = np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64)
    buf = io.BytesIO()
    Image.fromarray(a, mode="F").save(buf, format="TIFF")
    img = open_rgb(buf.getvalue())
    assert img.size == (64, 64) and np.asarray(img)[-1, -1, 0] == 255 and np.asarray(img)[0, 0, 0] == 0


# ---------------------------------------------------------------- 8. the command line's listing and limits

def test_a_fifo_and_a_dangling_link_in_a_folder_get_error_rows(tmp_path, capsys):
    cells = tmp_path / "cells"
    cells.mkdir()
    shutil.copy(next((ROOT / "samples" / "Uninfected").iterdir()), cells / "a.webp")
    os.mkfifo(cells / "pipe.png")
    (cells / "gone.png").symlink_to(tmp_path / "nowhere.png")
    assert main(["predict", str(cells), "--json"]) == 1
    rows = {Path(r["path"]).name: r for r in json.loads(capsys.readouterr().out)["results"]}
    assert rows["pipe.png"]["error"] == "not a regular file" and rows["gone.png"]["error"] == "file not found"
    assert rows["a.webp"]["label"] == "Uninfected"


def test_the_same_field_reached_twice_is_counted_once(tmp_path, capsys):
    (tmp_path / "link.JPG").symlink_to(FIELDS[0])
    out = tmp_path / "out.json"
    with pytest.warns(UserWarning, match="each file is counted once"):
        assert main(["smear", str(FIELDS[0]), str(tmp_path / "link.JPG"), str(FIELDS[0]), "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert len(report["fields"]) == 1 and report["summary"]["n_fields"] == 1


def test_the_command_line_and_the_server_share_one_field_limit_and_a_flag_raises_it(tmp_path):
    from malaria_detect.serve.app import Settings

    assert Settings().max_field_pixels == FIELD_MAX_PIXELS
    out = tmp_path / "out.json"
    assert main(["smear", str(FIELDS[0]), "--json", str(out), "--max-field-pixels", "1000000"]) == 1
    assert "image too large: 1280x960 pixels (limit 1,000,000)" in json.loads(out.read_text())["fields"][0]["error"]


def test_smear_exits_non_zero_when_no_cell_could_be_classified(tmp_path):
    blank = tmp_path / "blank.png"
    Image.new("RGB", (640, 480), (230, 220, 225)).save(blank)
    assert main(["smear", str(blank)]) == 1


# ---------------------------------------------------------------- 9. every bundled model carries a weights hash

def test_every_bundled_model_carries_its_weights_hash():
    for file in BUNDLED_NAMES.values():
        assert WEIGHTS_KEY in read_metadata(bundled_model_path().with_name(file)), file


def test_a_damaged_copy_of_the_bundled_model_is_refused_wherever_it_lies(tmp_path):
    blob = bytearray(bundled_model_path().read_bytes())
    blob[len(blob) // 2] ^= 0xFF  # one byte of the weights
    copy = tmp_path / "copy.onnx"
    copy.write_bytes(bytes(blob))
    with pytest.raises(ModelError, match="damaged"):
        Predictor.load(copy)


def test_a_cell_diameter_that_is_no_number_gets_a_message_that_says_so(tmp_path):
    from fastapi.testclient import TestClient

    from malaria_detect.serve.app import Settings, create_app

    with TestClient(create_app(Settings())) as c:
        for value in ("nan", "inf"):
            r = c.post(f"/smear?cell_diameter={value}", files=[("files", ("a.jpg", b"x", "image/jpeg"))])
            assert r.status_code == 422 and "finite number" in r.text and "2000" not in r.text
    with pytest.raises(SystemExit, match="between 6 and 2000 pixels"):
        main(["smear", str(FIELDS[0]), "--cell-diameter", "nan"])

"""The learned object detector: its targets and geometry, its decoding, and a tiny real run on the
sample fields (train -> checkpoint -> resume -> export -> ONNX -> smear --detector)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from malaria_detect.cli import main
from malaria_detect.data.objects import detector_split, labelled_fields
from malaria_detect.fields.detect import STRIDE, Detector, decode
from malaria_detect.training.detector_data import _rotate, targets

ROOT = Path(__file__).resolve().parents[1]


def test_flips_and_rotations_move_the_boxes_with_the_image():
    img = np.zeros((96, 96, 3), np.uint8)
    img[20:60, 10:30] = 255
    box = np.array([[10, 20, 30, 60]], np.float32)
    for k in range(4):
        for flip in (False, True):
            im2, b2, _ = _rotate(img, box, np.zeros((0, 4), np.float32), k, flip)
            x0, y0, x1, y1 = b2[0].astype(int)
            assert im2[y0:y1, x0:x1].mean() == 255 and im2.sum() == img.sum(), (k, flip)


def test_targets_peak_at_each_centre_and_weigh_unlabelled_kinds_zero():
    boxes = np.array([[8, 8, 40, 40], [50, 50, 90, 80]], np.float32)
    heat, weight, box_t, box_m = targets(boxes, np.array([0, 1]), np.zeros((0, 4), np.float32), (96, 96),
                                         labelled=("red cell",))
    assert (heat[0] == 1).sum() == 1 and (heat[1] == 1).sum() == 1 and box_m.sum() == 2
    assert weight[0].min() == 1 and weight[1].max() == 0 and weight[2].max() == 0  # IML boxes red cells only
    iy, ix = np.argwhere(heat[0] == 1)[0]
    assert np.exp(box_t[0, iy, ix]) * STRIDE == pytest.approx(32) and (ix + box_t[2, iy, ix]) * STRIDE == 24


def test_an_ignored_box_outside_the_crop_weighs_nothing_inside_it():
    for box in ([-100, -100, -60, -60], [10, -80, 50, -40], [-80, 10, -40, 50]):  # above-left, above, left
        _, weight, _, _ = targets(np.zeros((0, 4), np.float32), np.zeros(0, int), np.array([box], np.float32),
                                  (224, 224), labelled=("red cell",))
        assert weight[0].min() == 1, box


def test_decode_reads_boxes_at_the_heatmap_peaks():
    heat = np.zeros((3, 12, 12), np.float32)
    box = np.zeros((4, 12, 12), np.float32)
    heat[0, 3, 4], heat[1, 8, 8], heat[2, 1, 10] = 0.9, 0.8, 0.1  # the platelet is under its threshold
    box[:2, 3, 4], box[2:, 3, 4] = np.log(4.0), 0.5               # a 32 px box centred at (36, 28)
    b, k, s = decode(heat, box)
    assert list(k) == [0, 1] and b[0] == pytest.approx([20, 12, 52, 44])


def test_a_tiny_detector_run_resumes_exports_and_finds_objects(tmp_path):
    data = tmp_path / "data" / "iml-fields"
    data.mkdir(parents=True)
    (data / "images").symlink_to(ROOT / "samples" / "fields")
    (data / "annotations.json").symlink_to(ROOT / "samples" / "fields" / "annotations.json")
    train, val = detector_split(labelled_fields(tmp_path / "data"))
    assert [f.path.name for f in train] == ["PA171700.JPG", "PA171710.JPG"] and len(val) == 2
    run = tmp_path / "run"
    args = ["train-detector", "--data", str(tmp_path / "data"), "--out", str(run), "--batch-size", "2", "--crop", "96",
            "--val-every", "2", "--threads", "1"]
    assert main(args + ["--steps", "2"]) == 0
    assert main(args + ["--steps", "4", "--resume"]) == 0
    state = json.loads((run / "state.json").read_text())
    assert state["step"] == 4 and [h["step"] for h in state["history"]] == [2, 4]
    onnx = tmp_path / "det.onnx"
    assert main(["export-detector", "--run", str(run), "--out", str(onnx)]) == 0
    det = Detector.load(onnx)
    assert det.record["kinds"] == ["red cell", "white cell", "platelet"]
    rgb = np.asarray(__import__("PIL.Image", fromlist=["Image"]).open(ROOT / "samples" / "fields" / "PA171771.JPG"))
    boxes, kinds, scores, cell = det.detect(rgb)
    assert boxes.shape == (len(kinds), 4) and len(scores) == len(kinds)


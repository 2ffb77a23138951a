"""The command line: typed JSON, exit status for missing inputs, one counting rule, only the
project's own errors in one line, train/cv options generated from TrainConfig."""

from __future__ import annotations

import json
import shutil
from dataclasses import fields

import numpy as np
import pytest
from PIL import Image

from malaria_detect import cli
from malaria_detect.cli import build_parser, main
from malaria_detect.counting import plural
from malaria_detect.training.config import TrainConfig, default


@pytest.fixture()
def cells(samples, tmp_path):
    """Two real cells, one photo-like image that is not a cell, and a folder to hold them."""
    d = tmp_path / "in"
    d.mkdir()
    for p in sorted((samples / "Parasitized").iterdir())[:2]:
        shutil.copy(p, d / p.name)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (300, 400, 3), np.uint8)).save(d / "noise.png")  # not a cell
    return d


def test_json_is_typed_and_counts_follow_the_one_rule(cells, capsys, bundled):
    assert main(["predict", str(cells), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    rows = {r["path"].rsplit("/", 1)[-1]: r for r in out["results"]}
    cell = next(r for n, r in rows.items() if n.endswith(".webp"))
    assert isinstance(cell["p_parasitized"], float) and isinstance(cell["ood"], bool) and cell["error"] is None
    assert rows["noise.png"]["ood"] is True
    s = out["summary"]
    positive, negative = bundled.record.positive, bundled.record.negative
    assert isinstance(s["images"], int) and s["images"] == 3 and s["not_a_cell"] == 1 and s["errors"] == 0
    assert s[positive] + s[negative] == 2  # the not-a-cell image is counted apart ...
    assert s["parasitized_fraction"] == pytest.approx(s[positive] / 2)  # ... and left out of the fraction


def test_missing_input_exits_non_zero_after_writing_every_row(cells, tmp_path, capsys):
    out = tmp_path / "out.csv"
    rc = main(["predict", str(cells), str(tmp_path / "typo.png"), "--csv", str(out)])
    assert rc == 1
    rows = out.read_text().splitlines()
    assert len(rows) == 1 + 4 and rows[-1].endswith("file not found")  # strings only in CSV
    assert "1 of 4 inputs missing or unreadable" in capsys.readouterr().err
    assert main(["predict", str(cells)]) == 0
    assert "Exit status" in build_parser()[0]._subparsers._group_actions[0].choices["predict"].format_help()


def test_plural_and_batch_size_help(capsys):
    predict_help = build_parser()[0]._subparsers._group_actions[0].choices["predict"].format_help()
    assert "images per network batch" in predict_help
    assert plural(1, "image") == "1 image" and plural(2, "image") == "2 images"


def test_only_the_projects_errors_are_one_line(monkeypatch, capsys, tmp_path):
    assert main(["predict", str(tmp_path / "x.png"), "--model", str(tmp_path / "no.onnx")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model file not found" in err
    with pytest.raises(Exception, match="model file not found"):  # --debug: the traceback
        main(["--debug", "predict", str(tmp_path / "x.png"), "--model", str(tmp_path / "no.onnx")])
    with pytest.raises(Exception, match="model file not found"):
        main(["predict", str(tmp_path / "x.png"), "--model", str(tmp_path / "no.onnx"), "--debug"])

    def bug(a):
        raise ValueError("a real bug")

    monkeypatch.setattr(cli.training, "cmd_check_data", bug)
    with pytest.raises(ValueError, match="a real bug"):  # not turned into 'error: a real bug'
        main(["check-data", str(tmp_path)])


def test_train_and_cv_options_come_from_train_config():
    sub = build_parser()[0]._subparsers._group_actions[0].choices
    train = sub["train"].parse_args(["--data", "d", "--out", "o"])
    for f in fields(TrainConfig)[2:]:  # after data and out, which have no default
        assert getattr(train, f.name) == default(f.name), f.name
    given = sub["train"].parse_args(["--data", "d", "--out", "o", "--no-pretrained", "--patients", "p.csv",
                                     "--split", "0.5", "0.25", "0.25", "--robust-aug"])
    assert vars(given).items() >= {"pretrained": False, "patients_csv": "p.csv", "split": [0.5, 0.25, 0.25],
                                   "robust_aug": True}.items()
    cv = sub["cv"].parse_args(["--data", "d"])
    for name in ("epochs", "head_epochs", "image_size", "max_train_images", "seed", "batch_size", "lr"):
        assert getattr(cv, name) == default(name), name
    assert cv.model == default("model") and "(default: 112)" in sub["train"].format_help()
    with pytest.raises(SystemExit):
        sub["train"].parse_args(["--data", "d", "--out", "o", "--target-sensitivity", "1.5"])


def test_cv_passes_its_options_to_each_folds_training(samples, tmp_path, monkeypatch):
    import malaria_detect.evaluation.crossval as CV

    seen = {}

    def fake(data_dir, folds, model, out, **options):
        seen.update(options, folds=folds, model=model)
        return {"folds": folds, "model": model, "data": str(data_dir), "summary": {}, "leaked_patients": []}

    monkeypatch.setattr(CV, "cross_validate", fake)
    assert main(["cv", "--data", str(samples), "--folds", "3", "--epochs", "2", "--patients", "p.csv"]) == 0
    assert seen["folds"] == 3 and seen["epochs"] == 2 and seen["patients_csv"] == "p.csv"
    assert seen["image_size"] == default("image_size") and "data" not in seen

"""evaluate-fields scores by the acceptance checks' rules: it reproduces ../shared/tools/score_smear.py."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from malaria_detect.cli import main
from malaria_detect.evaluation.fieldscore import load_annotations, score_fields

ROOT = Path(__file__).resolve().parents[1]
SCORER = ROOT.parent / "shared" / "tools" / "score_smear.py"
FIELDS = ROOT / "samples" / "fields"
needs_scorer = pytest.mark.skipif(not SCORER.is_file(), reason="../shared/tools/score_smear.py is not there")


def _figures(line: str) -> dict:
    """name=value pairs of a scorer line, up to the floors."""
    return dict(re.findall(r"(\w+)=([^\s(]+)", line.split(" (floors")[0]))


def _both(tmp_path, report: dict, annotations: list, capsys) -> tuple[dict, dict]:
    res, ann = tmp_path / "report.json", tmp_path / "ann.json"
    res.write_text(json.dumps(report))
    ann.write_text(json.dumps(annotations))
    theirs = subprocess.run([sys.executable, str(SCORER), str(res), str(ann)], capture_output=True, text=True)
    assert main(["evaluate-fields", "--result", str(res), "--annotations", str(ann)]) == 0
    return _figures(theirs.stdout), _figures(capsys.readouterr().out)


@needs_scorer
def test_the_sample_fields_score_as_the_shared_scorer_scores_them(tmp_path, capsys):
    out = tmp_path / "smear.json"
    main(["smear", str(FIELDS), "--json", str(out)])
    capsys.readouterr()
    theirs, ours = _both(tmp_path, json.loads(out.read_text()), load_annotations(FIELDS / "annotations.json"), capsys)
    assert theirs == ours and float(ours["det_f1"]) > 0.9 and ours["fields"] == "4"


@needs_scorer
def test_white_cells_platelets_flags_and_missing_fields_score_alike(tmp_path, capsys):
    def obj(t, x, y, w=40, h=40):
        return {"type": t, "bbox": {"x": str(x), "y": str(y), "w": str(w), "h": str(h)}}

    ann = [{"image_name": "val/a.jpg", "objects": [obj("red blood cell", 10, 10), obj("red blood cell", 100, 10),
                                                    obj("white blood cell", 200, 200, 80, 80), obj("platelet", 300, 20, 12, 12),
                                                    obj("ring", 10, 100)]},
           {"image_name": "val/b.jpg", "objects": [obj("red blood cell", 10, 10)]},
           {"image_name": "val/c.jpg", "objects": [obj("red blood cell", 10, 10)]}]

    def cell(box, label="Uninfected", ood=False, kind=None):
        return {"box": box, "label": label, "ood": ood} | ({"kind": kind} if kind else {})

    report = {"fields": [
        {"image": "/x/a.jpg", "width": 400, "height": 400, "parasitemia": 0.25,
         "cells": [cell([10, 10, 50, 50]), cell([100, 10, 140, 50], "Parasitized"), cell([205, 205, 275, 275], "Parasitized"),
                   cell([300, 20, 312, 32], "Parasitized", ood=True), cell([12, 102, 50, 140], "Parasitized"),
                   cell([200, 200, 280, 280], None, kind="white cell"), cell([0, 0, 30, 30])]},
        {"image": "b.jpg", "width": 400, "height": 400, "error": "cannot decode image", "cells": []}]}
    theirs, ours = _both(tmp_path, report, ann, capsys)
    assert theirs == ours
    assert ours["missing"] == "2" and ours["wbc_called_parasitized"] == "1/1" and ours["wbc_recall"] == "1.000"
    s = score_fields(report, ann)
    assert s["fp_per_1000"] == pytest.approx(1000 * 2 / 5) and s["platelets_called_parasitized"] == [0, 1]


def test_evaluate_fields_refuses_bad_arguments(tmp_path):
    bad = tmp_path / "ann.json"
    bad.write_text('{"not": "a list"}')
    assert main(["evaluate-fields", str(FIELDS), "--annotations", str(bad)]) == 1
    with pytest.raises(SystemExit, match="not both"):
        main(["evaluate-fields", str(FIELDS), "--result", str(bad), "--annotations", str(FIELDS / "annotations.json")])


def test_smear_coco_round_trip_scores_itself_perfectly(tmp_path):
    """smear --coco writes COCO that evaluate-fields reads back as annotations: the report scored against
    its own boxes finds every cell and every call, and the stages agree."""
    import json
    from pathlib import Path

    from malaria_detect.cli import main
    from malaria_detect.data.annotations import load_annotations
    from malaria_detect.data.coco import CATEGORIES
    from malaria_detect.evaluation.fieldscore import score_fields, stage_scores

    fields = Path(__file__).resolve().parents[1] / "samples" / "fields"
    rep, coco = tmp_path / "r.json", tmp_path / "c.json"
    assert main(["smear", str(fields / "PA171771.JPG"), str(fields / "PA171700.JPG"), "--json", str(rep),
                 "--coco", str(coco)]) == 0
    c, report = json.loads(coco.read_text()), json.loads(rep.read_text())
    assert [i["file_name"] for i in c["images"]] == ["PA171771.JPG", "PA171700.JPG"]
    assert len(c["annotations"]) == sum(len(f["cells"]) for f in report["fields"])
    x, y, w, h = c["annotations"][0]["bbox"]
    assert [x, y, x + w, y + h] == report["fields"][0]["cells"][0]["box"]
    names = {k["id"]: k["name"] for k in CATEGORIES}
    called = [a for a in c["annotations"] if names[a["category_id"]] in ("ring", "trophozoite", "schizont",
                                                                          "gametocyte", "parasitized red cell")]
    assert len(called) == report["summary"]["n_parasitized"] > 0 and all(0 < a["score"] <= 1 for a in called)
    gt = load_annotations(coco)  # COCO in, the scorer's format out
    s = score_fields(report, gt)
    assert s["det_recall"] == 1 and s["inf_recall"] == 1 and s["inf_precision"] == 1 and s["fp_per_1000"] == 0
    st = stage_scores(report, gt)
    assert all(k == n for k, n in st["per_stage"].values())
    assert main(["evaluate-fields", str(fields / "PA171771.JPG"), str(fields / "PA171700.JPG"), "--annotations",
                 str(coco), "--json"]) == 0


def test_coco_with_unknown_categories_is_refused(tmp_path):
    import json

    import pytest

    from malaria_detect.data.annotations import load_annotations
    from malaria_detect.data.folders import DataError

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"images": [], "annotations": [], "categories": [{"id": 1, "name": "neutrophil?"}]}))
    with pytest.raises(DataError, match="not understood: neutrophil"):
        load_annotations(bad)

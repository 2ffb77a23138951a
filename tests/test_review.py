"""A person's review (review.py, store.py schema 2): decisions on the calls of a real field, the reviewed
counts beside the model's, kept across a restart, a database of schema 1 migrated, bad decisions refused
without writing anything, and the review exported as COCO and as a labelled cell folder that `adapt`
reads; over HTTP too."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from malaria_detect.review import ReviewError
from malaria_detect.store import MIGRATIONS, Store

FIELD = Path(__file__).resolve().parents[1] / "samples" / "fields" / "PA171771.JPG"
WHO = "A. Technician"


@pytest.fixture(scope="module")
def report():
    import malaria_detect as md

    rep = md.smear([FIELD])
    rep["fields"][0]["sample"] = "slide-9"
    return rep


def _called(field: dict) -> list[int]:
    return [i for i, c in enumerate(field["cells"]) if c.get("label") == "Parasitized" and not c.get("ood")]


def _empty_point(field: dict) -> tuple[float, float]:
    """A point of the field inside no object's box (where a missed cell is added)."""
    for y in range(20, field["height"] - 20, 10):
        for x in range(20, field["width"] - 20, 10):
            if not any(b[0] - 5 <= x <= b[2] + 5 and b[1] - 5 <= y <= b[3] + 5 for b in (c["box"] for c in field["cells"])):
                return x, y
    raise AssertionError("no empty point in the field")


def test_a_review_changes_the_reviewed_counts_only_and_survives_a_restart(report, tmp_path):
    db = tmp_path / "s.sqlite3"
    f = report["fields"][0]
    called = _called(f)
    assert len(called) >= 2, "the field should have at least two calls to review"
    unin = next(i for i, c in enumerate(f["cells"]) if c.get("label") == "Uninfected" and not c.get("ood"))
    with Store(db) as s:
        s.save_report(report)
        fid = f["field_id"]
        assert s.picture(fid)[:2] == b"\xff\xd8"  # the field kept as a JPEG
        s.add_review("slide-9", fid, {"cell": str(called[0]), "action": "reject"}, WHO)
        s.add_review("slide-9", fid, {"cell": str(called[1]), "action": "stage", "stage": "trophozoite"}, WHO)
        b = f["cells"][unin]["box"]
        inside = s.add_review("slide-9", fid, {"action": "add", "x": (b[0] + b[2]) / 2, "y": (b[1] + b[3]) / 2}, WHO)
        assert inside["cell"] == str(unin) and inside["action"] == "confirm"  # the cell under the click is called
        x, y = _empty_point(f)
        added = s.add_review("slide-9", fid, {"action": "add", "x": x, "y": y, "stage": "ring"}, "  B.  Reader ")
        assert added["cell"] is None and added["reviewer"] == "B. Reader"
        bx = added["box"]
        assert bx[0] <= x <= bx[2] and bx[1] <= y <= bx[3] and 20 < bx[2] - bx[0] < 200
    with Store(db) as s:  # after a restart
        rep = s.sample("slide-9")
        model, reviewed, st = rep["model_summary"], rep["reviewed"], rep["review"]
        assert model["n_parasitized"] == f["n_parasitized"] and rep["summary"] == model  # the model's, untouched
        assert reviewed["n_parasitized"] == f["n_parasitized"] - 1 + 2
        assert reviewed["n_cells"] == f["n_cells"] + 1  # the added red cell is counted
        assert reviewed["n_by_stage"].get("trophozoite", 0) == model["n_by_stage"].get("trophozoite", 0) + 1
        assert st["reviewed"] and not st["complete"] and st["reviewers"] == ["A. Technician", "B. Reader"]
        assert (st["n_rejected"], st["n_restaged"], st["n_added"], st["n_decided"]) == (1, 1, 2, 2)
        # the latest decision wins; clear withdraws; an added cell is withdrawn by its key
        s.add_review("slide-9", fid, {"cell": str(called[0]), "action": "confirm"}, WHO)
        s.add_review("slide-9", fid, {"cell": f"a{added['id']}", "action": "clear"}, WHO)
        for i in called[2:]:
            s.add_review("slide-9", fid, {"cell": str(i), "action": "confirm"}, WHO)
        rep = s.sample("slide-9", reviewed=True)
        assert rep["reviewed"]["n_parasitized"] == f["n_parasitized"] + 1 and rep["review"]["complete"]
        assert rep["summary"] == rep["reviewed"]  # reviewed=True: the report is the person's
        assert len(rep["reviews"]) == 4 + 2 + len(called[2:])  # every decision kept
        assert [s_["review"]["reviewed"] for s_ in s.samples()] == [True]


@pytest.mark.parametrize("decision, why", [
    ({"cell": "0", "action": "delete"}, "unknown review action"),
    ({"cell": "0", "action": "stage", "stage": "spore"}, "unknown stage"),
    ({"cell": "0", "action": "stage"}, "needs the stage"),
    ({"cell": "9999", "action": "reject"}, "has no object"),
    ({"action": "add", "x": 5000, "y": 10}, "outside the field"),
    ({"action": "add"}, "needs the point"),
])
def test_a_decision_that_does_not_fit_is_refused_and_nothing_is_written(report, tmp_path, decision, why):
    with Store(tmp_path / "s.sqlite3") as s:
        s.save_report(report)
        with pytest.raises(ReviewError, match=why):
            s.add_review("slide-9", report["fields"][0]["field_id"], decision, WHO)
        with pytest.raises(ReviewError, match="reviewer"):
            s.add_review("slide-9", report["fields"][0]["field_id"], {"cell": "0", "action": "reject"}, "  ")
        white = next(i for i, c in enumerate(report["fields"][0]["cells"]) if c["kind"] != "red cell")
        with pytest.raises(ReviewError, match="not a red cell"):
            s.add_review("slide-9", report["fields"][0]["field_id"], {"cell": str(white), "action": "reject"}, WHO)
        assert s.reviews("slide-9") == [] and not s.sample("slide-9")["review"]["reviewed"]


def test_a_database_of_schema_1_is_migrated_with_its_samples_kept(report, tmp_path):
    db = tmp_path / "old.sqlite3"
    con = sqlite3.connect(db)
    for statement in MIGRATIONS[1]:
        con.execute(statement)
    rec = {k: v for k, v in report["fields"][0].items() if k != "field_id"}
    con.execute("INSERT INTO samples VALUES ('old', '2026-11-01T00:00:00+00:00', '2026-11-01T00:00:00+00:00')")
    con.execute("INSERT INTO runs (created, source, class_names) VALUES ('2026-11-01', 'cli', "
                "'[\"Uninfected\", \"Parasitized\"]')")
    con.execute("INSERT INTO fields (run_id, sample, image, record) VALUES (1, 'old', ?, ?)", (rec["image"], json.dumps(rec)))
    con.execute("PRAGMA user_version = 1")
    con.commit()
    con.close()
    with Store(db) as s:
        assert s.version == 2
        rep = s.sample("old")
        assert rep["summary"]["n_cells"] == rec["n_cells"] and s.picture(1) is None
        s.add_review("old", 1, {"cell": str(_called(rec)[0]), "action": "reject"}, WHO)  # schema 2 works on old rows
        assert s.sample("old")["reviewed"]["n_parasitized"] == rec["n_parasitized"] - 1


def test_a_reviewed_sample_exports_coco_and_cells_that_adapt_reads(report, tmp_path, capsys):
    from malaria_detect.cli import main
    from malaria_detect.data.folders import find_images

    db = tmp_path / "s.sqlite3"
    f = report["fields"][0]
    with Store(db) as s:
        s.save_report(report)
    cells = tmp_path / "cells"
    rejected, *others = _called(f)
    n = len(others) + 1
    assert n >= 2  # the sample field has called cells to review
    with pytest.raises(SystemExit, match=rf"review is not complete \(0 of {n}"):
        main(["samples", "export", "slide-9", "--db", str(db), "--cells", str(cells)])
    with Store(db) as s:
        s.add_review("slide-9", f["field_id"], {"cell": str(rejected), "action": "reject"}, WHO)
        with pytest.raises(SystemExit, match=rf"\(1 of {n} called cells decided"):  # half a review is not one
            main(["samples", "export", "slide-9", "--db", str(db), "--cells", str(cells)])
        for i in others:
            s.add_review("slide-9", f["field_id"], {"cell": str(i), "action": "confirm"}, WHO)
    coco, html = tmp_path / "c.json", tmp_path / "r.html"
    assert main(["samples", "export", "slide-9", "--db", str(db), "--cells", str(cells), "--coco", str(coco),
                 "--report", str(html)]) == 0
    assert "with its review" in capsys.readouterr().out
    items = find_images(cells, cells / "patients.csv")
    n_pos = sum(i.label == 1 for i in items)
    assert n_pos == f["n_parasitized"] - 1 and len(items) - n_pos >= f["n_classified"] - f["n_parasitized"]
    names = {c["id"]: c["name"] for c in json.loads(coco.read_text())["categories"]}
    anns = json.loads(coco.read_text())["annotations"]
    assert names[anns[rejected]["category_id"]] == "red cell"  # the person's label, not the model's
    page = html.read_text()
    assert "rejected by the reviewer (1)" in page and "A. Technician" in page and "<th>Reviewed</th>" in page
    # the same report as a PDF: its text read back
    from pypdf import PdfReader

    pdf = tmp_path / "r.pdf"
    assert main(["samples", "export", "slide-9", "--db", str(db), "--report", str(pdf)]) == 0
    text = " ".join(" ".join(p.extract_text().split()) for p in PdfReader(pdf).pages)
    assert "Malaria thin-smear report: slide-9" in text and "Screening aid, not a diagnosis" in text
    assert "rejected by the reviewer (1)" in text and "reviewed by A. Technician" in text
    model_pm = f"{100 * f['parasitemia']:.2f}%"
    assert model_pm in text and "Reviewed" in text
    assert main(["samples", "show", "slide-9", "--db", str(db)]) == 0
    out = capsys.readouterr().out
    assert "reviewed by A. Technician" in out and "sample slide-9, reviewed:" in out


def test_the_page_reviews_over_http(bundled, tmp_path):
    from fastapi.testclient import TestClient

    from malaria_detect.serve.app import create_app
    from malaria_detect.serve.settings import Settings

    with TestClient(create_app(Settings(model=None, db=str(tmp_path / "s.sqlite3")), bundled)) as c:
        r = c.post("/smear?sample=ward-5", files=[("files", ("f.jpg", FIELD.read_bytes(), "image/jpeg"))]).json()
        f = r["fields"][0]
        assert "_picture" not in f and f["field_id"] >= 1
        pic = c.get(f"/samples/ward-5/fields/{f['field_id']}/picture")
        assert pic.status_code == 200 and pic.headers["content-type"] == "image/jpeg"
        assert c.get(f"/samples/other/fields/{f['field_id']}/picture").status_code == 404
        called = _called(f)
        ok = c.post("/samples/ward-5/reviews", json={"field_id": f["field_id"], "cell": str(called[0]),
                                                     "action": "reject", "reviewer": WHO})
        assert ok.status_code == 200, ok.text
        body = ok.json()
        assert body["reviewed"]["n_parasitized"] == body["model"]["n_parasitized"] - 1
        assert body["review"]["reviewers"] == [WHO]
        bad = c.post("/samples/ward-5/reviews", json={"field_id": f["field_id"], "cell": "99999", "action": "reject",
                                                      "reviewer": WHO})
        assert bad.status_code == 422 and "has no object" in bad.json()["detail"]
        assert c.post("/samples/ward-5/reviews", json={"field_id": 999, "cell": "1", "action": "reject",
                                                       "reviewer": WHO}).status_code == 404
        assert c.post("/samples/ward-5/reviews", json={"field_id": f["field_id"], "cell": "1",
                                                       "action": "reject"}).status_code == 422  # no reviewer
        page = c.get("/samples/ward-5/report.html")
        assert page.status_code == 200 and "script-src" not in page.headers["content-security-policy"]
        assert "Called by the model, rejected by the reviewer (1)" in page.text
        assert c.get("/samples/ward-5").json()["review"]["n_rejected"] == 1
        pdf = c.get("/samples/ward-5/report.pdf")
        assert pdf.status_code == 200 and pdf.content.startswith(b"%PDF") and "ward-5" in pdf.headers["content-disposition"]


def test_a_pdf_report_without_fpdf2_is_refused_before_any_work(monkeypatch, tmp_path, capsys):
    import sys

    from malaria_detect.cli import main

    monkeypatch.setitem(sys.modules, "fpdf", None)  # as if the [pdf] extra were not installed
    assert main(["smear", str(FIELD), "--report", str(tmp_path / "r.pdf"), "--db", str(tmp_path / "s.sqlite3")]) == 1
    assert "needs fpdf2: pip install 'malaria-detect[pdf]'" in capsys.readouterr().err
    assert not (tmp_path / "s.sqlite3").exists() and not (tmp_path / "r.pdf").exists()


def test_annotations_as_a_review_then_the_cells_calibrate_the_model(tmp_path, capsys):
    """The loop closed on the four annotated sample fields: smear them as one sample, review it with their
    annotations (samples review), export the reviewed cells, and `adapt` the field model on them."""
    from malaria_detect.cells.predictor import Predictor
    from malaria_detect.cli import main

    db, cells, out = tmp_path / "s.sqlite3", tmp_path / "cells", tmp_path / "lab.onnx"
    fields = FIELD.parent
    assert main(["smear", str(fields), "--sample", "lahore-1", "--db", str(db)]) == 0
    capsys.readouterr()
    assert main(["samples", "review", "lahore-1", "--db", str(db), "--annotations", str(fields / "annotations.json"),
                 "--reviewer", "IML annotators"]) == 0
    said = capsys.readouterr().out
    assert "on 4 of 4 fields kept" in said and "reviewed by IML annotators" in said
    with Store(db) as s:
        rep = s.sample("lahore-1", reviewed=True)
    truth = json.loads((fields / "annotations.json").read_text())
    n_inf = sum(o["type"] in ("ring", "trophozoite", "schizont", "gametocyte") for r in truth for o in r["objects"])
    assert rep["summary"]["n_parasitized"] == n_inf  # the person's count is the annotations' count
    assert rep["review"]["complete"]
    assert main(["samples", "export", "lahore-1", "--db", str(db), "--cells", str(cells)]) == 0
    assert main(["adapt", "--data", str(cells), "--out", str(out), "--model", "anylab"]) == 0
    adapted = Predictor.load(out).record.extra["adapted"]
    assert adapted["n_parasitized"] == n_inf and adapted["n_uninfected"] >= 400


def test_decisions_at_the_edges_count_as_a_person_means_them(report, tmp_path):
    """Found in review: a reject of a cell the model never called changes nothing (no 'added', no 'rejected');
    a withdrawn decision leaves a sample unreviewed; '0048' and '48' are one cell; a white cell cannot be
    rejected but can be called an infected red cell; a point on a cell already added is refused; a confirm
    naming another stage re-stages."""
    f = report["fields"][0]
    fid, called = None, _called(f)
    unin = next(i for i, c in enumerate(f["cells"]) if c.get("label") == "Uninfected" and not c.get("ood"))
    white = next(c for c in f["cells"] if c["kind"] == "white cell")
    with Store(tmp_path / "s.sqlite3") as s:
        s.save_report(report)
        fid = f["field_id"]
        b = f["cells"][unin]["box"]
        s.add_review("slide-9", fid, {"action": "add", "x": (b[0] + b[2]) / 2, "y": (b[1] + b[3]) / 2}, WHO)
        s.add_review("slide-9", fid, {"cell": str(unin), "action": "reject"}, WHO)  # taken back
        rep = s.sample("slide-9", reviewed=True)
        assert rep["reviewed"]["n_parasitized"] == f["n_parasitized"]
        assert (rep["review"]["n_added"], rep["review"]["n_rejected"]) == (0, 0)
        assert not any(c.get("review") for c in rep["fields"][0]["cells"])
        s.add_review("slide-9", fid, {"cell": str(called[0]), "action": "clear"}, WHO)
        s.add_review("slide-9", fid, {"cell": str(unin), "action": "clear"}, WHO)
        assert not s.sample("slide-9")["review"]["reviewed"]  # nothing in force: not reviewed
        s.add_review("slide-9", fid, {"cell": f"00{called[0]}", "action": "reject"}, WHO)
        s.add_review("slide-9", fid, {"cell": str(called[0]), "action": "confirm"}, WHO)
        assert s.sample("slide-9")["decisions"][str(fid)][str(called[0])]["action"] == "confirm"
        for cell in ("²", "-1", "a", "1.0"):
            with pytest.raises(ReviewError, match="has no object"):
                s.add_review("slide-9", fid, {"cell": cell, "action": "reject"}, WHO)
        wb, wi = white["box"], f["cells"].index(white)
        with pytest.raises(ReviewError, match="not a red cell: it can be called an infected red cell"):
            s.add_review("slide-9", fid, {"cell": str(wi), "action": "reject"}, WHO)
        # found on real fields: an infected cell the model took for a white cell; a click on it calls it one
        d = s.add_review("slide-9", fid, {"action": "add", "x": (wb[0] + wb[2]) / 2, "y": (wb[1] + wb[3]) / 2}, WHO)
        assert (d["cell"], d["action"]) == (str(wi), "confirm")
        rev = s.sample("slide-9")["reviewed"]
        assert rev["n_white_cells"] == f["n_white_cells"] - 1 and rev["n_cells"] == f["n_cells"] + 1
        x, y = _empty_point(f)
        s.add_review("slide-9", fid, {"action": "add", "x": x, "y": y}, WHO)
        with pytest.raises(ReviewError, match="already added there"):
            s.add_review("slide-9", fid, {"action": "add", "x": x + 1, "y": y}, WHO)
        other = next(st for st in ("ring", "schizont") if st != f["cells"][called[1]].get("stage"))
        d = s.add_review("slide-9", fid, {"cell": str(called[1]), "action": "confirm", "stage": other}, WHO)
        assert (d["action"], d["stage"]) == ("stage", other)
        assert s.sample("slide-9")["review"]["n_restaged"] == 1


@pytest.mark.parametrize("bad", ["MAL/2024/117", "..", "a\\b", "tab\there"])
def test_a_sample_id_no_route_could_name_is_refused(bundled, tmp_path, bad, capsys):
    from fastapi.testclient import TestClient

    from malaria_detect.cli import main
    from malaria_detect.serve.app import create_app
    from malaria_detect.serve.settings import Settings

    with TestClient(create_app(Settings(model=None, db=str(tmp_path / "s.sqlite3")), bundled)) as c:
        r = c.post("/smear", params={"sample": bad}, files=[("files", ("f.jpg", FIELD.read_bytes(), "image/jpeg"))])
        assert r.status_code == 422 and "MAL-2024-117" in r.json()["detail"]
    with pytest.raises(SystemExit, match="--sample"):
        main(["smear", str(FIELD), "--sample", bad, "--db", str(tmp_path / "t.sqlite3")])


def test_a_negative_slide_reviewed_from_its_annotations_is_complete_and_a_second_run_writes_nothing(tmp_path, capsys):
    """Four malaria-free TXL-PBC fields, no call: each marked seen, the review is complete and the cells
    export; the same annotations applied again write nothing."""
    from malaria_detect.cli import main

    txl = FIELD.parents[1] / "txl-pbc"
    db = tmp_path / "s.sqlite3"
    assert main(["smear", str(txl / "val"), "--sample", "neg-1", "--db", str(db)]) == 0
    args = ["samples", "review", "neg-1", "--db", str(db), "--annotations", str(txl / "annotations.json"),
            "--reviewer", WHO]
    assert main(args) == 0
    assert "4 decisions on 4 of 4 fields kept" in capsys.readouterr().out
    assert main(args) == 0
    assert "0 decisions on 4 of 4 fields kept (4 already in force)" in capsys.readouterr().out
    with Store(db) as s:
        st = s.sample("neg-1")["review"]
    assert st["complete"] and st["n_called"] == 0
    assert main(["samples", "export", "neg-1", "--db", str(db), "--cells", str(tmp_path / "cells")]) == 0
    assert not list((tmp_path / "cells" / "Parasitized").iterdir()) and list((tmp_path / "cells" / "Uninfected").iterdir())


def test_generic_parasitized_boxes_and_uncalled_cells(report):
    from malaria_detect.review import apply, from_annotations, status

    f = report["fields"][0] | {"field_id": 1}
    called = _called(f)
    b = f["cells"][called[0]]["box"]
    ann = {"image_name": "x", "objects": [{"type": "parasitized", "bbox": {"x": b[0], "y": b[1], "w": b[2] - b[0],
                                                                           "h": b[3] - b[1]}}]}
    ds = from_annotations(f, ann, "Parasitized")
    assert {"cell": str(called[0]), "action": "confirm", "stage": None} in ds and ds[-1] == {"action": "seen"}
    # a reject of a cell the model flagged not-a-cell changes nothing: the counts stay the model's
    ood = next(i for i, c in enumerate(f["cells"]) if c.get("ood"))
    d = [{"id": 1, "field_id": 1, "cell": str(ood), "action": "reject", "stage": None, "box": None, "reviewer": WHO,
          "created": "2026-12-02T00:00:00+00:00"}]
    r = apply(f, d, "Parasitized", "Uninfected")
    assert (r["n_classified"], r["n_not_a_cell"]) == (f["n_classified"], f["n_not_a_cell"])
    assert status([f], d, "Parasitized")["n_added"] == 0


def test_cells_are_cut_from_the_file_only_while_it_is_the_one_analysed(tmp_path):
    import shutil

    from PIL import Image

    import malaria_detect as md

    photo = tmp_path / "IMG_0001.jpg"
    shutil.copy(FIELD, photo)
    rep = md.smear([photo])
    rep["fields"][0]["sample"] = "s"
    with Store(tmp_path / "s.sqlite3") as s:
        s.save_report(rep)
        f = s.sample("s")["fields"][0]
        assert f["file_sha256"] and s.field_image(f, prefer_file=True).size == (f["width"], f["height"])
        Image.new("RGB", (f["width"], f["height"]), (0, 255, 0)).save(photo)  # another photo, the same name
        got = s.field_image(f, prefer_file=True)
        assert got is not None and got.getpixel((10, 10)) != (0, 255, 0)  # the stored picture, not the new file


def test_a_pdf_of_a_sample_named_in_another_script(bundled, tmp_path):
    from fastapi.testclient import TestClient

    from malaria_detect.serve.app import create_app
    from malaria_detect.serve.settings import Settings

    with TestClient(create_app(Settings(model=None, db=str(tmp_path / "s.sqlite3")), bundled)) as c:
        c.post("/smear", params={"sample": "患者 7"}, files=[("files", ("f.jpg", FIELD.read_bytes(), "image/jpeg"))])
        r = c.get("/samples/患者 7/report.pdf")
        assert r.status_code == 200 and r.content.startswith(b"%PDF")
        assert "filename*=UTF-8''%E6%82%A3%E8%80%85%207-report.pdf" in r.headers["content-disposition"]

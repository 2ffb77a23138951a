"""`malaria-detect samples list|show|review|export`: the samples database (store.py) read back, a
person's annotations applied as their review, and a sample exported with its review (JSON, COCO, the
printable report, a labelled cell folder for adapt and train)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .fields import check_pdf

DESCRIPTION = """\
Every smear (and every field the server analyses) is kept in the samples database, with its pictures;
a person reviews a sample on the page (Whole fields, or Samples > Open) or applies annotations here.

  malaria-detect samples list --search ward --since 2026-12-01
  malaria-detect samples show "slide 7"                    model and reviewed counts, who reviewed
  malaria-detect samples review "slide 7" --annotations ann.json --reviewer "A. Name"
  malaria-detect samples export "slide 7" --report r.pdf --coco c.json --cells lab_cells/
  malaria-detect adapt --data lab_cells/ --out lab.onnx --model anylab   the review calibrates the model
"""


def add_parsers(sub) -> dict:
    p = sub.add_parser("samples", help="the samples database: list, show, review or export analysed samples",
                       description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=("list", "show", "review", "export"),
                   help="list samples; show one; review one from annotations; export one (the review applied)")
    p.add_argument("sample", nargs="?", default=None, help="the sample id (show, review, export)")
    p.add_argument("--db", default=None, metavar="FILE.sqlite3", help="the database (default: as smear's)")
    p.add_argument("--search", default=None, help="list: ids containing this text")
    p.add_argument("--since", default=None, metavar="YYYY-MM-DD", help="list: updated on or after this date")
    p.add_argument("--json", default=None, metavar="OUT.json",
                   help="export: the sample's smear report (the review applied)")
    p.add_argument("--coco", default=None, metavar="OUT.json",
                   help="export: its objects as COCO, with the review's labels")
    p.add_argument("--report", default=None, metavar="OUT.html|.pdf",
                   help="export: its printable report (reviewed counts beside the model's; .pdf: a PDF)")
    p.add_argument("--annotations", default=None, metavar="ANN.json",
                   help="review: a person's annotations of the sample's fields (IML / TXL-PBC format or COCO, "
                        "matched by file name), applied as their review: red cells on an infected box called "
                        "parasitized at its stage, other calls rejected, infected boxes the model missed added, each "
                        "field marked looked at (one transaction; a second run writes nothing new)")
    p.add_argument("--reviewer", default=None, metavar="NAME", help="review: whose annotations these are")
    p.add_argument("--cells", default=None, metavar="DIR",
                   help="export: its red cells as a labelled cell folder (Parasitized/, Uninfected/, patients.csv) "
                        "with the review's labels, for adapt and train (a completely reviewed sample only)")
    return {"samples": cmd_samples}


def cmd_samples(a):
    from ..counting import FieldReport, Summary
    from ..review import status_text
    from ..store import Store, StoreError

    try:
        with Store(a.db) as db:
            if a.action == "list":
                rows = db.samples(a.search, a.since)
                for s in rows:
                    pm = "n/a" if s["parasitemia"] is None else f"{s['parasitemia']:.2%}"
                    print(f"{s['sample']}\t{s['updated']}\t{s['n_fields']} fields\t{s['n_cells']} red cells\t"
                          f"{s['n_parasitized']} parasitized\tparasitemia {pm}\t{status_text(s['review'])}")
                print(f"{len(rows)} sample{'s' * (len(rows) != 1)} in {db.path}")
                return 0
            if not a.sample:
                raise SystemExit(f"error: samples {a.action} needs a sample id (malaria-detect samples list)")
            if a.action == "review":
                return _review_sample(a, db)
            rep = db.sample(a.sample, reviewed=a.action == "export")
            if a.action == "export":
                _export_sample(a, db, rep)
                return 0
            revised = db.sample(a.sample, reviewed=True)["fields"]
    except StoreError as e:
        raise SystemExit(f"error: {e}") from None
    for f in rep["fields"]:
        print(FieldReport.of(f).format())
    print(f"\nsample {a.sample}, model: " + Summary.of(rep["fields"]).format())
    if rep["review"]["reviewed"]:
        print(f"sample {a.sample}, reviewed: {Summary.of(revised).format()}")
    print(status_text(rep["review"]))
    return 0


def _review_sample(a, db) -> int:
    """samples review ID --annotations ANN.json --reviewer NAME: the annotations as a person's review."""
    from ..data.annotations import load_annotations
    from ..review import from_annotations, status_text

    if not (a.annotations and a.reviewer):
        raise SystemExit("error: samples review needs --annotations ANN.json and --reviewer NAME")
    rep = db.sample(a.sample)
    by_name = {Path(r["image_name"]).name: r for r in load_annotations(a.annotations)}
    items, n_fields = [], 0
    for f in rep["fields"]:
        ann = by_name.get(Path(f["image"]).name)
        if f.get("error") or ann is None:
            continue
        n_fields += 1
        items += [(f["field_id"], d) for d in from_annotations(f, ann, rep["model"]["class_names"][1])]
    if not n_fields:
        raise SystemExit(f"error: no field of sample {a.sample} is annotated in {a.annotations} (matched by file name)")
    kept, skipped = db.add_reviews(a.sample, items, a.reviewer)  # one transaction; a second run writes nothing new
    for why in skipped:
        print(f"warning: skipped: {why}", file=sys.stderr)
    print(f"{len(kept)} decisions on {n_fields} of {len(rep['fields'])} fields kept"
          + (f" ({len(items) - len(kept) - len(skipped)} already in force)" if len(kept) + len(skipped) < len(items)
             else ""))
    print(status_text(db.sample(a.sample)["review"]))
    return 0


def _export_sample(a, db, rep: dict) -> None:
    """samples export: the sample with its review applied (JSON, COCO, HTML report, labelled cells)."""
    if not (a.json or a.coco or a.report or a.cells):
        raise SystemExit("error: samples export needs --json, --coco, --report or --cells")
    check_pdf(a.report)
    if a.cells and not rep["review"]["complete"]:
        r = rep["review"]
        raise SystemExit(f"error: sample {a.sample}: its review is not complete ({r['n_decided']} of {r['n_called']} "
                         "called cells decided): cells nobody looked at would carry the model's own labels, which "
                         "cannot calibrate the model; finish the review on the page (or samples review) first")
    if a.json:
        Path(a.json).write_text(json.dumps(rep, indent=1))
    if a.coco:
        from ..data.coco import to_coco

        Path(a.coco).write_text(json.dumps(to_coco(rep), indent=1))
    if a.report:
        from ..fields.htmlreport import write_report

        write_report(rep, a.report, picture=db.field_image)
    if a.cells:
        from ..data.cutcells import cut_reviewed

        n = cut_reviewed(rep, a.cells, lambda f: db.field_image(f, prefer_file=True))
        for e in n["errors"]:
            print(f"warning: {e}", file=sys.stderr)
        from .. import available_models

        names = {m["file"]: name for name, m in available_models().items()}
        model = names.get(rep["model"]["file"], rep["model"]["file"])
        print(f"{n['Parasitized']} parasitized and {n['Uninfected']} uninfected cells of {n['fields']} fields "
              f"written to {a.cells} (malaria-detect adapt --data {a.cells} --out lab.onnx --model {model} "
              "calibrates the model that analysed them)")
    print(f"sample {a.sample} exported" + (" (with its review)" if rep["review"]["reviewed"] else ""))

"""The whole-field second opinion (record.second_opinion): a red cell whose whole-field p falls short of the
field threshold, but not far, is also shown to the model's cell head, and is parasitized when that head is
sure. The rule on the record, how field-threshold chooses it (never adding a false call on malaria-free
validation fields), and what smear does with it on real IML fields."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
IML = ROOT / "samples" / "fields"


@pytest.fixture(scope="module")
def anylab():
    from malaria_detect.cells.predictor import Predictor

    return Predictor.load("anylab")


def with_second_opinion(record, obj: float | None, cell: float | None = None):
    extra = {k: v for k, v in record.extra.items() if k != "field_second_opinion"}
    if obj is not None:
        extra["field_second_opinion"] = {"object": obj, "cell": cell, "temperature": record.temperature}
    return replace(record, extra=extra)


def test_the_record_asks_the_cell_head_only_under_the_field_threshold_and_follows_it(anylab):
    rec = with_second_opinion(anylab.record, 0.5, 0.99)
    assert rec.second_opinion == (0.5, 0.99)
    p = np.array([0.95, 0.6, 0.6, 0.4, np.nan])
    p_cell = np.array([0.1, 0.995, 0.98, 0.999, 0.999])
    assert rec.second_opinion_asked(p, 0.9).tolist() == [False, True, True, False, False]
    assert rec.field_labels(p, p_cell, 0.9).tolist() == ["Parasitized", "Parasitized", "Uninfected", "Uninfected",
                                                          "Uninfected"]
    # a cell the cell head was not asked about (NaN) is decided by the whole-field head alone
    assert rec.field_labels(p, np.full(5, np.nan), 0.9).tolist() == ["Parasitized"] + ["Uninfected"] * 4
    none = with_second_opinion(anylab.record, None)
    assert none.second_opinion is None and not none.second_opinion_asked(p, 0.9).any()
    assert none.field_labels(p, p_cell, 0.9).tolist() == ["Parasitized"] + ["Uninfected"] * 4
    # adapt refits the cell head's temperature for single cells: the second opinion reads its p as chosen
    z = np.array([-1.0, 0.5, 3.0])
    moved = replace(rec, temperature=rec.temperature * 2)
    assert moved.second_opinion_p(z) == pytest.approx(rec.second_opinion_p(z))
    assert rec.second_opinion_p(z) == pytest.approx(rec.probability(z))
    assert moved.probability(z) != pytest.approx(rec.probability(z))
    # a model without a whole-field head has one head: no second opinion, whatever its extra says
    assert replace(rec, object_head=None).second_opinion is None


def test_smear_asks_the_cell_head_about_the_cells_in_the_window_on_real_fields(anylab):
    from malaria_detect.fields.analysis import SmearOptions, analyze_field, field_threshold

    pred = replace_record(anylab, with_second_opinion(anylab.record, 0.02, 0.5))
    thr = field_threshold(pred.record)
    every = {}
    asked = rescued = 0
    for path in sorted(IML.glob("*.JPG")):
        rec = analyze_field(pred, path)
        full = analyze_field(pred, path, opts=SmearOptions(cell_head=True))
        red = [c for c in rec["cells"] if c["p_parasitized"] is not None]
        assert all("p_cell_head" in c for c in full["cells"] if c["p_parasitized"] is not None)
        every.update({(path.name, tuple(c["box"])): c["p_cell_head"] for c in full["cells"] if "p_cell_head" in c})
        for c in red:
            window = 0.02 <= c["p_parasitized"] < thr
            assert ("p_cell_head" in c) == window
            if window:  # the same cell head's p whether asked alone or with every cell of the field
                assert c["p_cell_head"] == pytest.approx(every[(path.name, tuple(c["box"]))], abs=1e-5)
                asked += 1
                rescued += c["p_cell_head"] >= 0.5
            positive = c["p_parasitized"] >= thr or (window and c["p_cell_head"] >= 0.5)
            assert (c["label"] == "Parasitized") == positive
        assert rec["n_parasitized"] == sum(c["label"] == "Parasitized" and not c["ood"] for c in red)
    assert asked >= 3 and rescued >= 1  # the four sample fields hold cells in that window, some called by the cell head
    # without a second opinion no cell is asked (the shipped default costs nothing more)
    plain = replace_record(anylab, with_second_opinion(anylab.record, None))
    assert not any("p_cell_head" in c for c in analyze_field(plain, IML / "PA171772.JPG")["cells"])


def replace_record(pred, record):
    import copy

    out = copy.copy(pred)
    out.record = record
    return out


def _field(name, cells):
    return {"image": name, "width": 1280, "height": 960,
            "cells": [{"kind": "red cell", "box": list(b), "label": None, "p_parasitized": p, "ood": False,
                       "border": False, "p_cell_head": q} for b, p, q in cells]}


def _ann(name, objs):
    return {"image_name": name, "objects": [{"type": t, "bbox": {"x": b[0], "y": b[1], "w": b[2] - b[0],
                                                                "h": b[3] - b[1]}} for b, t in objs]}


def test_the_second_opinion_chosen_finds_more_parasites_and_adds_no_false_call(anylab):
    from malaria_detect.evaluation.operating import _row, choose_second_opinion

    A, B, C, D, E = (100, 100, 160, 160), (300, 100, 360, 160), (500, 100, 560, 160), (100, 300, 160, 360), \
        (300, 300, 360, 360)
    iml = [_field("i.jpg", [(A, 0.95, 0.5), (B, 0.5, 0.99), (C, 0.4, 0.6)])]
    iml_ann = [_ann("i.jpg", [(A, "ring"), (B, "ring"), (C, "red blood cell")])]
    # malaria-free: a look-alike both heads half believe, and one only the cell head is sure of
    txl = [_field("t.jpg", [(D, 0.7, 0.96), (E, 0.1, 0.9995)])]
    txl_ann = [_ann("t.jpg", [(D, "red blood cell"), (E, "red blood cell")])]
    reports, anns = ({"fields": iml}, {"fields": txl}), (iml_ann, txl_ann)
    alone = with_second_opinion(anylab.record, None)
    chosen = _row(reports, anns, alone, 0.9, threshold=0.9)
    assert chosen["iml_inf_recall"] == 0.5 and chosen["txl_fp_per_1000"] == 0
    second = choose_second_opinion(reports, anns, alone, chosen)
    # B found; neither TXL-PBC cell called; of the equal ones, the highest cell p, then whole-field p
    assert (second["object"], second["cell"]) == (0.5, 0.99)
    assert second["validation"]["iml_inf_recall"] == 1.0 and second["validation"]["txl_fp_per_1000"] == 0
    # nothing to gain without B: no second opinion
    iml_b = [_field("i.jpg", [(A, 0.95, 0.5), (B, 0.2, 0.3), (C, 0.4, 0.6)])]
    assert choose_second_opinion(({"fields": iml_b}, {"fields": txl}), anns, alone, chosen) is None


def test_the_csv_and_the_printed_report_say_when_the_cell_head_was_asked(tmp_path):
    import csv

    from malaria_detect.fields.report import write_csv
    from malaria_detect.fields.reportcontent import caption

    asked = {"kind": "red cell", "box": [1, 2, 30, 40], "label": "Parasitized", "p_parasitized": 0.71, "ood": False,
             "border": False, "stage": "ring", "p_stage": 0.8, "p_cell_head": 0.991}
    plain = dict(asked, p_parasitized=0.95, p_cell_head=None)
    assert caption({"image": "a/f.jpg"}, asked) == ["f.jpg", "p = 0.71, cell head 0.99", "ring"]
    assert caption({"image": "a/f.jpg"}, plain) == ["f.jpg", "p = 0.95", "ring"]
    write_csv({"fields": [{"image": "f.jpg", "cells": [asked, plain]}]}, tmp_path / "c.csv")
    rows = list(csv.DictReader(open(tmp_path / "c.csv")))
    assert [r["p_cell_head"] for r in rows] == ["0.991000", ""]

"""The one counting rule (counting.py): what the CLI, the API, Ray and the page's summaries count by."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from malaria_detect.cells.predictor import Prediction
from malaria_detect.counting import (
    WHO_MIN_CELLS,
    Counts,
    FieldReport,
    ImageSummary,
    Summary,
    field_counts,
    format_field,
    wilson,
)
from malaria_detect.record import Record

POS = "Parasitized"
ANSWERS = [(POS, False), ("Uninfected", False), ("Uninfected", False), (POS, True), (None, False), (None, True)]


def test_flagged_and_unlabelled_answers_are_counted_apart_and_left_out_of_the_fraction():
    c = Counts.of(ANSWERS, POS)
    assert (c.n_cells, c.n_classified, c.n_parasitized, c.n_not_a_cell, c.n_unclassified) == (6, 3, 1, 1, 2)
    assert c.parasitemia == pytest.approx(1 / 3) and c.ci95 == wilson(1, 3)
    assert Counts.of([], POS).parasitemia is None and Counts.of([], POS).ci95 is None


def test_pooling_adds_counts_and_recomputes_the_interval():
    a, b = Counts.of(ANSWERS, POS), Counts.of([(POS, False)] * 4, POS)
    pooled = a + b
    assert pooled.n_cells == 10 and pooled.n_classified == 7 and pooled.n_parasitized == 5
    assert pooled.ci95 == wilson(5, 7) and Counts.from_dict(pooled.to_dict()) == pooled


def test_summary_of_fields_pools_them_with_the_who_note_and_parasites_per_ul():
    cells = [{"label": POS if i < 3 else "Uninfected", "ood": i == 9} for i in range(600)]
    f1 = {"image": "a.jpg", "cells": cells} | field_counts(cells, POS)
    f2 = {"image": "b.jpg", "cells": [], "error": "cannot decode image"} | field_counts([], POS)
    s = Summary.of([f1, f2], rbc_per_ul=5_000_000)
    d = s.to_dict()
    assert d["n_fields"] == 2 and d["n_errors"] == 1 and d["n_classified"] == 599 and d["n_not_a_cell"] == 1
    assert d["parasitemia"] == pytest.approx(3 / 599) and d["parasites_per_ul"] == round(3 / 599 * 5_000_000)
    assert "note" not in d  # 599 >= WHO_MIN_CELLS
    few = Summary.of([{"image": "c.jpg", "cells": cells[:10]} | field_counts(cells[:10], POS)]).to_dict()
    assert f"at least {WHO_MIN_CELLS}-2,000" in few["note"] and "parasites_per_ul" not in few
    assert "600 red cells, 3 parasitized, 1 not a cell, 0 white cells; parasitemia 0.50% (95% CI" in s.format()
    assert "1 unreadable" in s.format()


def test_white_cells_are_reported_beside_the_red_cells_never_among_them():
    cells = [{"kind": "red cell", "label": POS, "ood": False}, {"kind": "red cell", "label": "Uninfected", "ood": False},
             {"kind": "white cell", "label": None, "ood": False}]
    c = field_counts(cells, POS)
    assert c["n_cells"] == 2 and c["n_white_cells"] == 1 and c["parasitemia"] == 0.5 and c["n_unclassified"] == 0
    s = Summary.of([{"image": "a"} | c, {"image": "b"} | c]).to_dict()
    assert s["n_white_cells"] == 2 and s["n_cells"] == 4


def test_a_field_line_and_an_image_summary_read_as_the_terminal_shows_them():
    cells = [{"label": POS, "ood": False}, {"label": "Uninfected", "ood": False}]
    rec = {"image": "f.jpg"} | field_counts(cells, POS)
    assert format_field(rec) == ("f.jpg\t2 red cells, 1 parasitized, 0 not a cell, 0 white cells; parasitemia "
                                 "50.00% [9.45%, 90.55%]")
    assert format_field({"image": "x.jpg", "error": "file not found"}) == "x.jpg\tERROR file not found"
    typed = FieldReport.of(rec)
    assert typed.counts == Counts.from_dict(rec) and typed.to_dict() == {k: rec[k] for k in typed.to_dict()}
    record = Record("efficientnet_lite0", 112, (0.5,) * 3, (0.5,) * 3)
    preds = [Prediction("a", POS, 0.9, False), Prediction("b", "Uninfected", 0.1, False),
             Prediction("c", POS, 0.8, True), Prediction("d", error="file not found")]
    s = ImageSummary.of(preds, record)
    assert s.to_dict() == {"images": 4, POS: 1, "Uninfected": 1, "parasitized_fraction": 0.5, "not_a_cell": 1,
                           "errors": 1}
    assert s.format().startswith("4 images: 1 Parasitized, 1 Uninfected (parasitized fraction 50.0% of the 2 cells)")


def test_the_sample_fields_report_is_the_summary_of_its_fields(bundled_field_report):
    report = bundled_field_report
    assert report["summary"] == Summary.of(report["fields"]).to_dict()
    for f in report["fields"]:
        keys = [*Counts().to_dict(), "n_white_cells", "n_platelets", "n_by_stage"]
        assert {k: f[k] for k in keys} == field_counts(f["cells"], POS)
        assert f["n_cells"] == sum(c["kind"] == "red cell" for c in f["cells"])
    json.dumps(report)  # plain JSON types only


@pytest.fixture(scope="module")
def bundled_field_report():
    import malaria_detect as md

    fields = Path(__file__).resolve().parents[1] / "samples" / "fields"
    return md.smear(sorted(fields.glob("*.JPG"))[:2])


def test_the_stopping_rule_says_how_many_more_fields_reach_the_target():
    from malaria_detect.counting import TARGET_CELLS, stopping_rule, stopping_text

    assert TARGET_CELLS == 2000  # the WHO thin-film count
    c = Counts(n_cells=610, n_classified=600, n_parasitized=6, n_not_a_cell=10)
    s = stopping_rule(c, n_fields=4)
    assert s == {"target_cells": 2000, "reached": False, "cells_to_go": 1400, "cells_per_field": 150.0,
                 "more_fields": 10}  # 1,400 more at 150 a field: 9.33 -> 10 fields
    assert "1,400 of 2,000 red cells still to count: about 10 more fields" in stopping_text(s)
    assert stopping_rule(c, 4, target=500)["reached"] and "reached" in stopping_text(stopping_rule(c, 4, 500))
    assert stopping_rule(Counts(), 0)["more_fields"] is None  # nothing classified yet: no estimate


def test_the_smear_summary_carries_the_stopping_rule(bundled_field_report):
    s = bundled_field_report["summary"]
    st = s["stopping"]
    assert st["target_cells"] == 2000 and st["cells_to_go"] == 2000 - s["n_classified"] > 0
    assert st["more_fields"] >= 1 and st["cells_per_field"] == round(s["n_classified"] / s["n_fields"], 1)
    assert Summary.of(bundled_field_report["fields"], target_cells=100).stopping["reached"]

"""What a sample's report says, whatever it is printed as (htmlreport: a page; pdfreport: a PDF): the
facts of each sample, the model's and the reviewed counts side by side, the gallery's cells and their
captions, the crops. Plain text and PIL images; nothing is counted here (counting.py counted it).

Each sample: sample id, date, operator, model file and weights hash, fields and red cells counted,
parasitemia with its 95 % interval, parasites/uL when the red-cell count per uL was given, parasitized
cells by stage, white cells and platelets, the stopping-rule verdict, the review status, the gallery of
parasitized cells, and the "screening aid, not a diagnosis" statement. A reviewed sample
(store.Store.sample(..., reviewed=True)) is reported as reviewed: its counts are the reviewed ones, beside
the model's; the gallery marks each cell confirmed, re-staged or added, and the model's calls the
reviewer rejected are shown apart.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

from PIL import Image

from ..counting import percent, plural, stopping_text
from ..imaging import FIELD_MAX_PIXELS, ImageError, open_rgb
from ..review import status_text

GALLERY_MAX = 60        # parasitized cells shown per sample (the most probable first)
STATEMENT = ("Screening aid, not a diagnosis: every count here was made by software and must be confirmed by "
             "a trained microscopist before any clinical decision.")
MARK = {"confirmed": "✓ confirmed", "restaged": "✓ re-staged", "added": "+ added by the reviewer",
        "rejected": "✗ rejected"}


def when_text(when: datetime | None = None) -> str:
    return (when or datetime.now(timezone.utc)).strftime("%Y-%m-%d %H:%M UTC")


def open_field(field: dict):
    """A field's image from its file (the default `picture`), or None when it cannot be read."""
    try:
        return open_rgb(field["image"], FIELD_MAX_PIXELS, max_side=None)
    except (ImageError, OSError, ValueError):
        return None


def sample_name(sample: dict) -> str:
    return str(sample.get("sample") or "(unnamed)")


def sections(report: dict) -> list[tuple[dict, list[dict]]]:
    """(the sample's summary, its fields) for each sample of a smear report."""
    if not report.get("samples"):
        return [({"sample": None} | report["summary"], report["fields"])]
    return [(s, [f for f in report["fields"] if f.get("sample") == s["sample"]]) for s in report["samples"]]


def positive(report: dict) -> str:
    return report.get("model", {}).get("class_names", ["", "Parasitized"])[1]


def is_reviewed(report: dict) -> bool:
    return bool(report.get("review", {}).get("reviewed") and report.get("model_summary"))


def parasitemia_text(s: dict, none: str = "n/a (no red cell classified)") -> str:
    pm, ci = s.get("parasitemia"), s.get("parasitemia_ci95")
    return none if pm is None else f"{percent(pm)} (95 % CI {percent(ci[0])}–{percent(ci[1])})"


def stages_text(s: dict, none: str = "none named") -> str:
    return ", ".join(f"{n} {k}" for k, n in (s.get("n_by_stage") or {}).items()) or none


def facts(sample: dict, report: dict, operator: str | None, when: str) -> list[tuple[str, str]]:
    """The report's table of one sample: (label, text); the parasitemia row is labelled 'Parasitemia'."""
    model = report.get("model", {})
    rows = [("Sample", sample_name(sample)), ("Date", when),
            ("Operator", operator or "(not given)"),
            ("Model", f"{model.get('file')} (weights sha256 {model.get('weights_sha256')})"),
            ("Fields", f"{sample['n_fields']} analysed" + (f", {sample['n_errors']} unreadable" if sample["n_errors"]
                                                          else "")),
            ("Red cells", f"{sample['n_cells']:,} found, {sample['n_classified']:,} classified, "
                          f"{sample['n_not_a_cell']} flagged not a cell"),
            ("Parasitized", f"{sample['n_parasitized']:,}; by stage: {stages_text(sample)}"),
            ("Parasitemia", parasitemia_text(sample))]
    if sample.get("parasites_per_ul") is not None:
        rows.append(("Parasites/µL", f"{sample['parasites_per_ul']:,}"))
    rows += [("White cells, platelets", f"{plural(sample.get('n_white_cells', 0), 'white cell')}, "
                                        f"{plural(sample.get('n_platelets', 0), 'platelet')}"),
             ("Stopping rule", stopping_text(sample["stopping"]).removeprefix("stopping rule: ")
              if sample.get("stopping") else "–"),
             ("Review", status_text(report["review"]) if report.get("review")
              else "not reviewed: the calls below are the model's")]
    return rows


def counts_side_by_side(model: dict, reviewed: dict) -> list[tuple[str, str, str]]:
    """(what, the model's, the reviewed) rows."""
    rows = [("Red cells classified", lambda s: f"{s['n_classified']:,}"),
            ("Parasitized", lambda s: f"{s['n_parasitized']:,}"),
            ("Parasitemia (95 % CI)", lambda s: parasitemia_text(s, "n/a").replace("95 % CI ", "")),
            ("By stage", lambda s: stages_text(s, "–"))]
    return [(k, f(model), f(reviewed)) for k, f in rows]


def gallery(fields: list[dict], positive: str, rejected: bool = False) -> list[tuple[dict, dict]]:
    """(field, cell) of every parasitized cell (or, `rejected`, every call of the model a reviewer rejected):
    the cells a person decided on first (so that the shown ones hold every reviewed cell), each group the
    most probable first (cells a person added have no score)."""
    picks = [(f, c) for f in fields if not f.get("error") for c in f["cells"]
             if (c.get("review") == "rejected" if rejected else c.get("label") == positive and not c.get("ood"))]
    def key(t):
        c = t[1]
        return c.get("review") is None, -(c["p_parasitized"] if c.get("p_parasitized") is not None else -1.0)
    return sorted(picks, key=key)


def caption(field: dict, cell: dict) -> list[str]:
    """The lines under a gallery crop: its field, p (and the cell head's, where asked), its stage, the
    review's mark."""
    prob = f"p = {cell['p_parasitized']:.2f}" if cell.get("p_parasitized") is not None else "no model score"
    if cell.get("p_cell_head") is not None:  # the second opinion was asked (record.second_opinion)
        prob += f", cell head {cell['p_cell_head']:.2f}"
    lines = [Path(field["image"]).name, prob] + ([cell["stage"]] if cell.get("stage") else [])
    return lines + ([MARK[cell["review"]]] if cell.get("review") in MARK else [])


class Crops:
    """Gallery crops cut from each field's picture (`picture(field)`: PIL at any scale, or None), each
    field's picture read once."""

    def __init__(self, picture=None):
        self.picture, self.images = picture or open_field, {}

    def __call__(self, field: dict, cell: dict, side: int) -> Image.Image | None:
        key = field.get("field_id") or field["image"]
        if key not in self.images:
            self.images[key] = self.picture(field)
        img = self.images[key]
        if img is None:
            return None
        k = img.width / field["width"]
        x0, y0, x1, y1 = (v * k for v in cell["box"])
        half, cx, cy = max(x1 - x0, y1 - y0) * 0.65, (x0 + x1) / 2, (y0 + y1) / 2
        crop = img.crop((int(max(0, cx - half)), int(max(0, cy - half)),
                         int(min(img.width, cx + half)), int(min(img.height, cy + half))))
        return crop.resize((side, side), Image.BILINEAR)

"""A sample's report to print or file (`smear --report sample.html`): one self-contained HTML page
(images inline, no script, print CSS so that the browser's "Save as PDF" gives clean pages), one
section per sample, with what the server or command counted (counting.py): nothing is counted here.

Each section: sample id, date, operator, model file and weights hash, fields and red cells counted,
parasitemia with its 95 % interval, parasites/uL when the red-cell count per uL was given, parasitized
cells by stage, white cells and platelets, the stopping-rule verdict, the gallery of parasitized cells
(crops from the fields), the review status, and the "screening aid, not a diagnosis" statement.

A reviewed sample (store.Store.sample(..., reviewed=True)) is reported as reviewed: its counts are the
reviewed ones, beside the model's; the gallery marks each cell confirmed, re-staged or added, and shows
the model's calls the reviewer rejected apart.
"""

from __future__ import annotations

import base64
import io
from datetime import datetime, timezone
from html import escape
from pathlib import Path

from PIL import Image

from ..counting import percent, plural, stopping_text
from ..imaging import FIELD_MAX_PIXELS, ImageError, open_rgb
from ..review import status_text

GALLERY_MAX = 60        # parasitized cells shown per sample (the most probable first)
CROP_SIDE = 96          # pixels of each gallery crop
STATEMENT = ("Screening aid, not a diagnosis: every count here was made by software and must be confirmed by "
             "a trained microscopist before any clinical decision.")

CSS = """
body { font: 14px/1.45 system-ui, sans-serif; color: #111; margin: 1.5rem; }
h1 { font-size: 1.35rem; margin: 0 0 .3rem; } h2 { font-size: 1.1rem; margin: 1.2rem 0 .4rem; }
table { border-collapse: collapse; margin: .4rem 0; } td, th { padding: .2rem .7rem .2rem 0; text-align: left; }
th { font-weight: 600; color: #333; } .key { font-size: 1.25rem; font-weight: 700; }
.statement { border: 2px solid #b00; padding: .5rem .7rem; margin: .8rem 0; font-weight: 600; }
.gallery { display: flex; flex-wrap: wrap; gap: .4rem; } .gallery figure { margin: 0; width: 96px; }
.gallery img { width: 96px; height: 96px; display: block; border: 1px solid #999; }
.gallery figcaption { font-size: .72rem; color: #333; } .note { color: #444; }
.counts td, .counts th { border-bottom: 1px solid #ccc; } .rejected img { opacity: .6; border-style: dashed; }
section.sample { page-break-after: always; break-after: page; }
@media print { body { margin: 0; } .gallery figure { break-inside: avoid; } }
"""


def _crop(img: Image.Image, box) -> str:
    x0, y0, x1, y1 = box
    side = max(x1 - x0, y1 - y0) * 1.3
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    crop = img.crop((int(max(0, cx - side / 2)), int(max(0, cy - side / 2)),
                     int(min(img.width, cx + side / 2)), int(min(img.height, cy + side / 2))))
    buf = io.BytesIO()
    crop.resize((CROP_SIDE, CROP_SIDE), Image.BILINEAR).save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def _open(field: dict):
    try:
        return open_rgb(field["image"], FIELD_MAX_PIXELS, max_side=None)
    except (ImageError, OSError, ValueError):
        return None


MARK = {"confirmed": "✓ confirmed", "restaged": "✓ re-staged", "added": "+ added by the reviewer",
        "rejected": "✗ rejected"}


def _gallery(fields: list[dict], positive: str, picture, rejected: bool = False) -> tuple[str, int]:
    """The crops of the parasitized cells (or, `rejected`, of the model's calls a reviewer rejected)."""
    picks = [(c.get("p_parasitized") or 0.0, f, c) for f in fields if not f.get("error") for c in f["cells"]
             if (c.get("review") == "rejected" if rejected else c.get("label") == positive and not c.get("ood"))]
    picks.sort(key=lambda t: -t[0])
    items, images = [], {}
    for _, f, c in picks[:GALLERY_MAX]:
        key = f.get("field_id") or f["image"]
        if key not in images:
            images[key] = picture(f)
        img = images[key]
        if img is None:
            continue
        k = img.width / f["width"]
        stage = f", {escape(c['stage'])}" if c.get("stage") else ""
        prob = f"p = {c['p_parasitized']:.2f}" if c.get("p_parasitized") is not None else "no model score"
        mark = f"<br>{MARK[c['review']]}" if c.get("review") in MARK else ""
        src = _crop(img, [v * k for v in c["box"]])
        cls = f' class="{escape(c["review"])}"' if c.get("review") else ""
        items.append(f'<figure{cls}><img src="{src}" '
                     f'alt="parasitized cell"><figcaption>{escape(Path(f["image"]).name)}<br>{prob}{stage}{mark}'
                     '</figcaption></figure>')
    return "".join(items), len(picks)


def _counts_table(model: dict, reviewed: dict) -> str:
    """The model's counts and the reviewed counts side by side."""
    def pm(s):
        ci = s.get("parasitemia_ci95")
        if s.get("parasitemia") is None:
            return "n/a"
        return f"{percent(s['parasitemia'])} ({percent(ci[0])}–{percent(ci[1])})"

    def stages(s):
        return ", ".join(f"{n} {escape(k)}" for k, n in (s.get("n_by_stage") or {}).items()) or "–"
    rows = [("Red cells classified", lambda s: f"{s['n_classified']:,}"),
            ("Parasitized", lambda s: f"{s['n_parasitized']:,}"), ("Parasitemia (95 % CI)", pm),
            ("By stage", stages)]
    return ('<table class="counts"><tr><th></th><th>Model</th><th>Reviewed</th></tr>'
            + "".join(f"<tr><th>{k}</th><td>{f(model)}</td><td>{f(reviewed)}</td></tr>" for k, f in rows)
            + "</table>")


def _section(sample: dict, fields: list[dict], report: dict, operator: str | None, when: str, picture) -> str:
    positive = report.get("model", {}).get("class_names", ["", "Parasitized"])[1]
    model = report.get("model", {})
    pm, ci = sample.get("parasitemia"), sample.get("parasitemia_ci95")
    pm_text = "n/a (no red cell classified)" if pm is None else \
        f"{percent(pm)} (95 % CI {percent(ci[0])}–{percent(ci[1])})"
    stages = ", ".join(f"{n} {escape(k)}" for k, n in (sample.get("n_by_stage") or {}).items()) or "none named"
    rows = [("Sample", escape(str(sample.get("sample") or "(unnamed)"))), ("Date", when),
            ("Operator", escape(operator) if operator else "(not given)"),
            ("Model", f"{escape(str(model.get('file')))} (weights sha256 {escape(str(model.get('weights_sha256')))})"),
            ("Fields", f"{sample['n_fields']} analysed" + (f", {sample['n_errors']} unreadable" if sample["n_errors"]
                                                          else "")),
            ("Red cells", f"{sample['n_cells']:,} found, {sample['n_classified']:,} classified, "
                          f"{sample['n_not_a_cell']} flagged not a cell"),
            ("Parasitized", f"{sample['n_parasitized']:,}; by stage: {stages}"),
            ("Parasitemia", f'<span class="key">{pm_text}</span>')]
    if sample.get("parasites_per_ul") is not None:
        rows.append(("Parasites/µL", f"{sample['parasites_per_ul']:,}"))
    rows += [("White cells, platelets", f"{plural(sample.get('n_white_cells', 0), 'white cell')}, "
                                        f"{plural(sample.get('n_platelets', 0), 'platelet')}"),
             ("Stopping rule", escape(stopping_text(sample["stopping"]).removeprefix("stopping rule: "))
              if sample.get("stopping") else "–"),
             ("Review", escape(status_text(report["review"])) if report.get("review")
              else "not reviewed: the calls below are the model's")]
    reviewed = bool(report.get("review", {}).get("reviewed") and report.get("model_summary"))
    table = _counts_table(report["model_summary"], sample) if reviewed else ""
    gallery, n = _gallery(fields, positive, picture)
    rejected, n_rejected = _gallery(fields, positive, picture, rejected=True) if reviewed else ("", 0)
    rejected = (f"<h2>Called by the model, rejected by the reviewer ({n_rejected})</h2>"
                f'<div class="gallery">{rejected}</div>') if n_rejected else ""
    note = f'<p class="note">{escape(sample["note"])}</p>' if sample.get("note") else ""
    shown = f" (the {GALLERY_MAX} most probable shown)" if n > GALLERY_MAX else ""
    return (f'<section class="sample"><h1>Malaria thin-smear report: {escape(str(sample.get("sample")))}</h1>'
            f'<p class="statement">{STATEMENT}</p><table>'
            + "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows) + f"</table>{table}{note}"
            f"<h2>Parasitized cells ({n}){shown}</h2><div class=\"gallery\">{gallery or '<p>none</p>'}</div>"
            f"{rejected}</section>")


def render_report(report: dict, operator: str | None = None, when: datetime | None = None, picture=None) -> str:
    """The smear report (with `samples`) as one HTML page. `picture(field)`: the field's image (PIL, any
    scale) for the gallery; by default its file is read."""
    when_text = (when or datetime.now(timezone.utc)).strftime("%Y-%m-%d %H:%M UTC")
    samples = report.get("samples") or [{"sample": None} | report["summary"]]
    sections = [_section(s, [f for f in report["fields"] if f.get("sample") == s["sample"]]
                         if report.get("samples") else report["fields"], report, operator, when_text,
                         picture or _open)
                for s in samples]
    return ('<!doctype html><html lang="en"><head><meta charset="utf-8"><meta name="viewport" '
            'content="width=device-width, initial-scale=1"><title>malaria-detect report</title>'
            f"<style>{CSS}</style></head><body>{''.join(sections)}</body></html>")


def write_report(report: dict, path: str | Path, operator: str | None = None, picture=None) -> Path:
    path = Path(path)
    path.write_text(render_report(report, operator, picture=picture), encoding="utf-8")
    return path

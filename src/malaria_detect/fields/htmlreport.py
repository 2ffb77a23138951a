"""A sample's report to print or file (`smear --report sample.html`): one self-contained HTML page
(images inline, no script, print CSS so that the browser's "Save as PDF" gives clean pages), one
section per sample, with what the server or command counted (counting.py): nothing is counted here.

Each section: sample id, date, operator, model file and weights hash, fields and red cells counted,
parasitemia with its 95 % interval, parasites/uL when the red-cell count per uL was given, parasitized
cells by stage, white cells and platelets, the stopping-rule verdict, the gallery of parasitized cells
(crops from the fields), the review status, and the "screening aid, not a diagnosis" statement.
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


def _gallery(fields: list[dict], positive: str) -> tuple[str, int]:
    picks = [(c["p_parasitized"], f, c) for f in fields if not f.get("error") for c in f["cells"]
             if c.get("label") == positive and not c.get("ood")]
    picks.sort(key=lambda t: -t[0])
    items, images = [], {}
    for p, f, c in picks[:GALLERY_MAX]:
        if f["image"] not in images:
            try:
                images[f["image"]] = open_rgb(f["image"], FIELD_MAX_PIXELS, max_side=None)
            except (ImageError, OSError, ValueError):
                images[f["image"]] = None
        img = images[f["image"]]
        if img is None:
            continue
        stage = f", {escape(c['stage'])}" if c.get("stage") else ""
        items.append(f'<figure><img src="{_crop(img, c["box"])}" alt="parasitized cell"><figcaption>'
                     f'{escape(Path(f["image"]).name)}<br>p = {p:.2f}{stage}</figcaption></figure>')
    return "".join(items), len(picks)


def _section(sample: dict, fields: list[dict], report: dict, operator: str | None, when: str) -> str:
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
             ("Review", "not reviewed: the calls below are the model's")]
    gallery, n = _gallery(fields, positive)
    note = f'<p class="note">{escape(sample["note"])}</p>' if sample.get("note") else ""
    shown = f" (the {GALLERY_MAX} most probable shown)" if n > GALLERY_MAX else ""
    return (f'<section class="sample"><h1>Malaria thin-smear report: {escape(str(sample.get("sample")))}</h1>'
            f'<p class="statement">{STATEMENT}</p><table>'
            + "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows) + f"</table>{note}"
            f"<h2>Parasitized cells ({n}){shown}</h2><div class=\"gallery\">{gallery or '<p>none</p>'}</div>"
            "</section>")


def render_report(report: dict, operator: str | None = None, when: datetime | None = None) -> str:
    """The smear report (with `samples`) as one HTML page."""
    when_text = (when or datetime.now(timezone.utc)).strftime("%Y-%m-%d %H:%M UTC")
    samples = report.get("samples") or [{"sample": None} | report["summary"]]
    sections = [_section(s, [f for f in report["fields"] if f.get("sample") == s["sample"]]
                         if report.get("samples") else report["fields"], report, operator, when_text)
                for s in samples]
    return ('<!doctype html><html lang="en"><head><meta charset="utf-8"><meta name="viewport" '
            'content="width=device-width, initial-scale=1"><title>malaria-detect report</title>'
            f"<style>{CSS}</style></head><body>{''.join(sections)}</body></html>")


def write_report(report: dict, path: str | Path, operator: str | None = None) -> Path:
    path = Path(path)
    path.write_text(render_report(report, operator), encoding="utf-8")
    return path

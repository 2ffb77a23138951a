"""A sample's report to print or file (`smear --report sample.html`, the page's "Print report"): one
self-contained HTML page (images inline, no script, print CSS so that the browser's "Save as PDF"
gives clean pages), one section per sample. What it says is fields.reportcontent's; pdfreport.py
prints the same as a PDF.
"""

from __future__ import annotations

import base64
import io
from datetime import datetime
from html import escape
from pathlib import Path

from . import reportcontent as rc

CROP_SIDE = 96          # pixels of each gallery crop
STATEMENT = rc.STATEMENT

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


def _gallery(picks: list[tuple[dict, dict]], crops: rc.Crops) -> str:
    items = []
    for f, c in picks[:rc.GALLERY_MAX]:
        im = crops(f, c, CROP_SIDE)
        if im is None:
            continue
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=85)
        src = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()
        cls = f' class="{escape(c["review"])}"' if c.get("review") else ""
        items.append(f'<figure{cls}><img src="{src}" alt="parasitized cell"><figcaption>'
                     + "<br>".join(escape(t) for t in rc.caption(f, c)) + "</figcaption></figure>")
    return "".join(items)


def _section(sample: dict, fields: list[dict], report: dict, operator: str | None, when: str, crops) -> str:
    rows = "".join(f"<tr><th>{escape(k)}</th><td>" + (f'<span class="key">{escape(v)}</span>' if k == "Parasitemia"
                                                      else escape(v)) + "</td></tr>"
                   for k, v in rc.facts(sample, report, operator, when))
    table = ""
    if rc.is_reviewed(report):
        table = ('<table class="counts"><tr><th></th><th>Model</th><th>Reviewed</th></tr>'
                 + "".join(f"<tr><th>{escape(k)}</th><td>{escape(m)}</td><td>{escape(r)}</td></tr>"
                           for k, m, r in rc.counts_side_by_side(report["model_summary"], sample)) + "</table>")
    picks = rc.gallery(fields, rc.positive(report))
    rejected = rc.gallery(fields, rc.positive(report), rejected=True) if rc.is_reviewed(report) else []
    rejected_html = (f"<h2>Called by the model, rejected by the reviewer ({len(rejected)})</h2>"
                     f'<div class="gallery">{_gallery(rejected, crops)}</div>') if rejected else ""
    note = f'<p class="note">{escape(sample["note"])}</p>' if sample.get("note") else ""
    shown = f" ({rc.GALLERY_MAX} shown: those reviewed, then the most probable)" if len(picks) > rc.GALLERY_MAX else ""
    return (f'<section class="sample"><h1>Malaria thin-smear report: {escape(rc.sample_name(sample))}</h1>'
            f'<p class="statement">{escape(STATEMENT)}</p><table>{rows}</table>{table}{note}'
            f"<h2>Parasitized cells ({len(picks)}){shown}</h2>"
            f"<div class=\"gallery\">{_gallery(picks, crops) or '<p>none</p>'}</div>{rejected_html}</section>")


def render_report(report: dict, operator: str | None = None, when: datetime | None = None, picture=None) -> str:
    """The smear report (with `samples`) as one HTML page. `picture(field)`: the field's image (PIL, any
    scale) for the gallery; by default its file is read."""
    crops, when = rc.Crops(picture), rc.when_text(when)
    body = "".join(_section(s, fields, report, operator, when, crops) for s, fields in rc.sections(report))
    return ('<!doctype html><html lang="en"><head><meta charset="utf-8"><meta name="viewport" '
            'content="width=device-width, initial-scale=1"><title>malaria-detect report</title>'
            f"<style>{CSS}</style></head><body>{body}</body></html>")


def write_report(report: dict, path: str | Path, operator: str | None = None, picture=None) -> Path:
    """Write the report: HTML, or PDF when `path` ends in .pdf (pdfreport.py, the [pdf] extra)."""
    path = Path(path)
    if path.suffix.lower() == ".pdf":
        from .pdfreport import write_pdf

        return write_pdf(report, path, operator, picture=picture)
    path.write_text(render_report(report, operator, picture=picture), encoding="utf-8")
    return path

"""A sample's report as a PDF (`smear --report sample.pdf`, `samples export ID --report r.pdf`): what
fields.reportcontent says, laid out by fpdf2 (pure Python, the [pdf] extra; no browser, no system
library). One page (or more) per sample: the statement, the facts, the model's and the reviewed counts,
the gallery of parasitized cells with their captions, the rejected calls apart.

Text is set in DejaVu Sans when the system has it; else in the PDF's own Helvetica, with the report's own
few characters outside Latin-1 spelled out (– as -, ✓ as "ok", ✗ as "x"). Any other character the font
cannot show (a sample id in another script) is printed as its code, \\u60a3, so that two ids never read
the same. Gallery captions are cut to the crop's width, one line each.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from ..errors import MalariaDetectError
from . import reportcontent as rc

FONT_PATHS = ("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf", "/usr/share/fonts/TTF/DejaVuSans.ttf",
              "/Library/Fonts/DejaVuSans.ttf", "C:/Windows/Fonts/DejaVuSans.ttf")
CROP_MM, PER_ROW = 24, 7          # the gallery: crops of 24 mm, seven to a row of an A4 page
LATIN1 = str.maketrans({"–": "-", "—": "-", "✓": "ok", "✗": "x", "µ": "u", "…": "...", "’": "'", "“": '"',
                        "”": '"', "·": "-"})


class PdfError(MalariaDetectError, RuntimeError):
    """The PDF cannot be made (fpdf2 is not installed)."""


def new_pdf():
    """An empty A4 document with the report's font; PdfError when fpdf2 is missing."""
    try:
        from fpdf import FPDF
    except ImportError:
        raise PdfError("a PDF report needs fpdf2: pip install 'malaria-detect[pdf]' (or write the report "
                       "as .html and print it to PDF from the browser)") from None
    pdf = FPDF(format="A4")
    pdf.set_auto_page_break(True, margin=14)
    font = next((p for p in FONT_PATHS if Path(p).exists()), None)
    pdf.glyphs = None
    if font:
        pdf.add_font("body", "", font)
        bold = Path(font).with_name("DejaVuSans-Bold.ttf")
        pdf.add_font("body", "B", str(bold) if bold.exists() else font)
        pdf.glyphs = set(pdf.fonts["body"].cmap) if hasattr(pdf.fonts["body"], "cmap") else None
    pdf.unicode = font is not None
    return pdf


def _t(pdf, text: str) -> str:
    """Text as the document's font can show it; other characters as their code (\\u60a3)."""
    if not pdf.unicode:
        text = text.translate(LATIN1)
        return "".join(ch if ord(ch) < 256 else f"\\u{ord(ch):04x}" for ch in text)
    if pdf.glyphs is None:
        return text
    return "".join(ch if ord(ch) in pdf.glyphs or ch in "\n\t" else f"\\u{ord(ch):04x}" for ch in text)


def _fit(pdf, text: str, width: float) -> str:
    """`text` cut (with an ellipsis) to fit `width` mm in the current font."""
    text = _t(pdf, text)
    if pdf.get_string_width(text) <= width:
        return text
    dots = "..." if not pdf.unicode else "…"
    while text and pdf.get_string_width(text + dots) > width:
        text = text[:-1]
    return text + dots


def _font(pdf, size: float, bold: bool = False) -> None:
    pdf.set_font("body" if pdf.unicode else "helvetica", "B" if bold else "", size)


CAPTION_LINES, LINE_MM = 4, 2.8   # a caption: file, p, stage, the review's mark; one line each


def _gallery(pdf, picks, crops) -> None:
    x0 = pdf.l_margin
    gap = (pdf.w - pdf.l_margin - pdf.r_margin - PER_ROW * CROP_MM) / (PER_ROW - 1)
    row_h = CROP_MM + 1 + CAPTION_LINES * LINE_MM + 2
    row_top = pdf.get_y()
    for i, (f, c) in enumerate(picks[:rc.GALLERY_MAX]):
        if i % PER_ROW == 0:
            if i:
                row_top += row_h
            if row_top + row_h > pdf.h - pdf.b_margin:
                pdf.add_page()
                row_top = pdf.get_y()
        x = x0 + (i % PER_ROW) * (CROP_MM + gap)
        im = crops(f, c, 160)
        if im is not None:
            pdf.image(im, x=x, y=row_top, w=CROP_MM, h=CROP_MM)
        _font(pdf, 6.5)
        for k, line in enumerate(rc.caption(f, c)[:CAPTION_LINES]):
            pdf.set_xy(x, row_top + CROP_MM + 1 + k * LINE_MM)
            pdf.cell(CROP_MM, LINE_MM, _fit(pdf, line, CROP_MM))
    pdf.set_xy(pdf.l_margin, row_top + row_h if picks else row_top)


def _section(pdf, sample: dict, fields: list[dict], report: dict, operator: str | None, when: str, crops) -> None:
    pdf.add_page()
    _font(pdf, 15, True)
    pdf.multi_cell(0, 7, _t(pdf, f"Malaria thin-smear report: {rc.sample_name(sample)}"), align="L",
                   new_x="LMARGIN", new_y="NEXT")
    pdf.ln(2)
    pdf.set_draw_color(176, 0, 0)
    pdf.set_line_width(0.6)
    _font(pdf, 10, True)
    pdf.multi_cell(0, 5.5, _t(pdf, rc.STATEMENT), border=1, padding=2, align="L", new_x="LMARGIN", new_y="NEXT")
    pdf.set_draw_color(0)
    pdf.set_line_width(0.2)
    pdf.ln(3)
    _font(pdf, 9.5)
    with pdf.table(col_widths=(42, 140), text_align="LEFT", first_row_as_headings=False, borders_layout="NONE",
                   line_height=5) as table:
        for k, v in rc.facts(sample, report, operator, when):
            row = table.row()
            row.cell(_t(pdf, k))
            row.cell(_t(pdf, v))
    if rc.is_reviewed(report):
        pdf.ln(2)
        with pdf.table(col_widths=(48, 67, 67), text_align="LEFT", line_height=5,
                       borders_layout="HORIZONTAL_LINES") as table:
            for cells in [("", "Model", "Reviewed"), *rc.counts_side_by_side(report["model_summary"], sample)]:
                row = table.row()
                for v in cells:
                    row.cell(_t(pdf, v))
    if sample.get("note"):
        pdf.ln(2)
        _font(pdf, 9)
        pdf.multi_cell(0, 4.5, _t(pdf, sample["note"]), align="L", new_x="LMARGIN", new_y="NEXT")
    picks = rc.gallery(fields, rc.positive(report))
    shown = f" ({rc.GALLERY_MAX} shown: those reviewed, then the most probable)" if len(picks) > rc.GALLERY_MAX else ""
    pdf.ln(3)
    _font(pdf, 11.5, True)
    pdf.cell(0, 7, _t(pdf, f"Parasitized cells ({len(picks)}){shown}"), new_x="LMARGIN", new_y="NEXT")
    _gallery(pdf, picks, crops)
    rejected = rc.gallery(fields, rc.positive(report), rejected=True) if rc.is_reviewed(report) else []
    if rejected:
        _font(pdf, 11.5, True)
        pdf.cell(0, 7, _t(pdf, f"Called by the model, rejected by the reviewer ({len(rejected)})"),
                 new_x="LMARGIN", new_y="NEXT")
        _gallery(pdf, rejected, crops)


def render_pdf(report: dict, operator: str | None = None, when: datetime | None = None, picture=None) -> bytes:
    """The smear report (with `samples`) as a PDF, one section (new page) per sample."""
    pdf, crops, when = new_pdf(), rc.Crops(picture), rc.when_text(when)
    pdf.set_title("malaria-detect report")
    pdf.set_creator("malaria-detect")
    for s, fields in rc.sections(report):
        _section(pdf, s, fields, report, operator, when, crops)
    return bytes(pdf.output())


def write_pdf(report: dict, path: str | Path, operator: str | None = None, picture=None) -> Path:
    path = Path(path)
    path.write_bytes(render_pdf(report, operator, picture=picture))
    return path

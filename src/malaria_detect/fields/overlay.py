"""A field drawn with its cells and counts, for a person to look at."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from ..imaging import FIELD_MAX_PIXELS, open_rgb


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


WHITE_CELL, PLATELET, OTHER = (30, 90, 230), (184, 134, 11), (120, 60, 160)
LEGEND = [("uninfected", (0, 150, 60)), ("parasitized (stage)", (220, 0, 0)), ("not a cell", (150, 150, 150)),
          ("white cell", WHITE_CELL), ("platelet", PLATELET), ("other", OTHER)]
STAGE_SHORT = {"ring": "R", "trophozoite": "T", "schizont": "S", "gametocyte": "G"}


def draw_overlay(src, rec: dict, positive: str) -> Image.Image:
    """The field with every object drawn (uninfected red cells thin green, parasitized (`positive`, the
    model's positive class name) bold red with its probability and stage letter (R ring, T trophozoite,
    S schizont, G gametocyte), not-a-cell grey, white cells blue with "WBC", platelets ochre, other
    objects purple), and the counts and a legend in a header band."""
    img = src if isinstance(src, Image.Image) else open_rgb(src, FIELD_MAX_PIXELS, max_side=None)
    scale = max(1.0, img.width / 1280)
    head = int(64 * scale)
    out = Image.new("RGB", (img.width, img.height + head), (255, 255, 255))
    out.paste(img, (0, head))
    d = ImageDraw.Draw(out)
    big, small = _font(int(20 * scale)), _font(int(14 * scale))
    for c in rec["cells"]:
        x0, y0, x1, y1 = c["box"]
        box = (x0, y0 + head, x1 - 1, y1 - 1 + head)
        if c.get("kind", "red cell") == "white cell":
            d.rectangle(box, outline=WHITE_CELL, width=max(2, int(2 * scale)))
            d.text((x0 + 2, y0 + head + 2), "WBC", fill=WHITE_CELL, font=small, stroke_width=2,
                   stroke_fill=(255, 255, 255))
        elif c.get("kind") == "platelet":
            d.rectangle(box, outline=PLATELET, width=max(1, int(scale)))
        elif c.get("kind") == "other":
            d.rectangle(box, outline=OTHER, width=max(1, int(scale)))
        elif c["ood"] or c["label"] is None:
            d.rectangle(box, outline=(150, 150, 150), width=max(1, int(scale)))
        elif c["label"] == positive:
            d.rectangle(box, outline=(220, 0, 0), width=max(3, int(4 * scale)))
            stage = f" {STAGE_SHORT.get(c['stage'], c['stage'])}" if c.get("stage") else ""
            d.text((x0 + 2, y0 + head - int(18 * scale)), f"{c['p_parasitized']:.2f}{stage}", fill=(220, 0, 0),
                   font=big, stroke_width=2, stroke_fill=(255, 255, 255))
        else:
            d.rectangle(box, outline=(0, 150, 60), width=max(1, int(scale)))
    pm = rec.get("parasitemia")
    ci = rec.get("parasitemia_ci95")
    text = (f"{Path(rec['image']).name}: {rec['n_cells']} red cells, {rec['n_parasitized']} parasitized, "
            f"{rec['n_not_a_cell']} not a cell, {rec.get('n_white_cells', 0)} white; parasitemia "
            + (f"{pm:.2%} (95% CI {ci[0]:.2%}-{ci[1]:.2%})" if pm is not None else "n/a"))
    d.text((int(8 * scale), int(10 * scale)), text, fill=(0, 0, 0), font=big)
    x, y = int(8 * scale), int(40 * scale)  # the legend, on a second line
    for label, colour in LEGEND:
        d.rectangle((x, y, x + int(14 * scale), y + int(14 * scale)), outline=colour, width=max(2, int(scale)))
        d.text((x + int(18 * scale), y - int(1 * scale)), label, fill=(0, 0, 0), font=small)
        x += int(d.textlength(label, font=small)) + int(34 * scale)
    return out

"""COCO detection JSON, out of a smear report and into the annotated-field format the scorer reads, so
that CVAT, Label Studio, QuPath and FiftyOne open what `smear` found and a lab's own COCO boxes score it.

    to_coco(report)          # smear --coco: images, boxes [x, y, w, h], categories, scores
    from_coco(coco_dict)     # -> [{"image_name", "width", "height", "objects": [{"type", "bbox"}]}]

Categories (ids fixed, so files from different runs agree): red cell (uninfected), parasitized red cell
(stage not named), ring, trophozoite, schizont, gametocyte (parasitized, by stage), white cell,
platelet, other. A red cell flagged "not a cell" or left unclassified keeps its category "red cell" with
`attributes.ood` / no score. Each annotation's `score` is the model's: p(parasitized) for a parasitized
cell, 1 - p for an uninfected one; objects that are not classified have none.
"""

from __future__ import annotations

from pathlib import Path

from .folders import DataError

CATEGORIES = [{"id": 1, "name": "red cell"}, {"id": 2, "name": "parasitized red cell"},
              {"id": 3, "name": "ring"}, {"id": 4, "name": "trophozoite"}, {"id": 5, "name": "schizont"},
              {"id": 6, "name": "gametocyte"}, {"id": 7, "name": "white cell"}, {"id": 8, "name": "platelet"},
              {"id": 9, "name": "other"}]
_ID = {c["name"]: c["id"] for c in CATEGORIES}
STAGES = ("ring", "trophozoite", "schizont", "gametocyte")
# COCO category names (lower case) -> the annotated-field types of IML / TXL-PBC (data.annotations)
TYPE_OF = {"red cell": "red blood cell", "red blood cell": "red blood cell", "rbc": "red blood cell",
           "uninfected": "red blood cell", "white cell": "white blood cell", "white blood cell": "white blood cell",
           "wbc": "white blood cell", "platelet": "platelet", "platelets": "platelet", "difficult": "difficult",
           **{s: s for s in STAGES}, "trophozoites": "trophozoite", "rings": "ring", "gametocytes": "gametocyte",
           "schizonts": "schizont"}
GENERIC_INFECTED = {"parasitized red cell", "parasitized", "infected"}


def category(cell: dict, positive: str) -> str:
    kind = cell.get("kind", "red cell")
    if kind != "red cell":
        return kind if kind in _ID else "other"
    if cell.get("label") == positive and not cell.get("ood"):
        return cell.get("stage") if cell.get("stage") in STAGES else "parasitized red cell"
    return "red cell"


def to_coco(report: dict, positive: str | None = None) -> dict:
    """A smear report (smear --json) as COCO detection JSON."""
    positive = positive or report.get("model", {}).get("class_names", ["", "Parasitized"])[1]
    images, annotations = [], []
    for i, f in enumerate(report["fields"], 1):
        if f.get("error"):
            continue
        images.append({"id": i, "file_name": Path(f["image"]).name, "width": f["width"], "height": f["height"]})
        for c in f["cells"]:
            x0, y0, x1, y1 = c["box"]
            name = category(c, positive)
            ann = {"id": len(annotations) + 1, "image_id": i, "category_id": _ID[name],
                   "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0), "iscrowd": 0,
                   "attributes": {"ood": bool(c.get("ood")), "border": bool(c.get("border"))}}
            if c.get("p_parasitized") is not None:
                p = float(c["p_parasitized"])
                ann["score"] = round(p if name not in ("red cell",) else 1 - p, 6)
                ann["attributes"]["p_parasitized"] = p
            if c.get("p_stage") is not None:
                ann["attributes"]["p_stage"] = float(c["p_stage"])
            annotations.append(ann)
    model = report.get("model", {})
    return {"info": {"description": "malaria-detect smear", "model": model.get("file"),
                     "field_threshold": model.get("threshold")},
            "images": images, "annotations": annotations, "categories": CATEGORIES}


def is_coco(data) -> bool:
    return isinstance(data, dict) and {"images", "annotations", "categories"} <= set(data)


def from_coco(data: dict) -> list[dict]:
    """COCO detection JSON -> annotated-field records (the IML / TXL-PBC format the scorer reads). A
    category named after a stage is that stage; "parasitized" without a stage counts as infected (its
    stage unknown: type "parasitized"); unknown names raise DataError naming them."""
    cats = {c["id"]: str(c["name"]).strip().lower() for c in data["categories"]}
    unknown = sorted({n for n in cats.values() if n not in TYPE_OF and n not in GENERIC_INFECTED and n != "other"})
    if unknown:
        raise DataError(f"COCO categories not understood: {', '.join(unknown)} (known: red cell, parasitized, "
                        f"{', '.join(STAGES)}, white cell, platelet, other, difficult)")
    by_image = {img["id"]: {"image_name": img["file_name"], "width": img.get("width"), "height": img.get("height"),
                            "objects": []} for img in data["images"]}
    for a in data["annotations"]:
        name = cats.get(a["category_id"])
        rec = by_image.get(a["image_id"])
        if rec is None or name is None or name == "other":
            continue
        x, y, w, h = (float(v) for v in a["bbox"])
        rec["objects"].append({"type": "parasitized" if name in GENERIC_INFECTED else TYPE_OF[name],
                               "bbox": {"x": x, "y": y, "w": w, "h": h}})
    return list(by_image.values())

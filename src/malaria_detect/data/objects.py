"""Annotated fields of several labs as objects (red cell, white cell, platelet) for the detector, with
the splits it is trained and chosen on. Torch-free.

    fields = labelled_fields("../shared/data")          # every annotated field of IML and TXL-PBC
    train, val = detector_split(fields)                  # by block and by the dataset's own split

Labs and splits (never at random: neighbouring IML image numbers are likely the same slide):
- IML_Malaria: PA171690-769 train, PA171770-799 validation, PA1718xx held out (never read here).
  Only red cells are boxed (white cells and platelets are not labelled: `labelled` says which kinds a
  field's boxes cover, so a detector is not taught that an unboxed white cell is background).
- TXL-PBC: its own train/ and val/; red cells, white cells and platelets boxed, border cells included.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .annotations import INFECTED_TYPES, box_of, load_annotations

KINDS = ("red cell", "white cell", "platelet")
TYPE_KIND = {"red blood cell": "red cell", **dict.fromkeys(INFECTED_TYPES, "red cell"),
             "white blood cell": "white cell", "platelet": "platelet"}
IML_TRAIN, IML_VAL = range(171690, 171770), range(171770, 171800)


@dataclass
class LabelledField:
    path: Path
    lab: str                                   # "IML" or "TXL-PBC"
    split: str                                 # "train", "val" or "held-out"
    boxes: list = field(default_factory=list)  # (x0, y0, x1, y1)
    kinds: list = field(default_factory=list)  # one of KINDS per box
    stages: list = field(default_factory=list)  # the IML life stage of an infected red cell, else None
    ignore: list = field(default_factory=list)  # boxes of "difficult" objects: neither object nor background
    labelled: tuple = KINDS                    # the kinds that the boxes cover completely
    border_boxed: bool = True                  # whether cells cut by the image border are boxed


def _iml_split(name: str) -> str:
    n = int(Path(name).stem[2:8]) if Path(name).stem[2:8].isdigit() else -1
    return "train" if n in IML_TRAIN else "val" if n in IML_VAL else "held-out"


def labelled_fields(data_root: str | Path) -> list[LabelledField]:
    """The annotated fields of ../shared/data (IML_Malaria and TXL-PBC) that are there."""
    root = Path(data_root)
    out = []
    sources = [("IML", root / "iml-fields"), ("TXL-PBC", root / "txl-pbc")]
    for lab, folder in sources:
        if not (folder / "annotations.json").is_file():
            continue
        for rec in load_annotations(folder / "annotations.json"):
            name = rec["image_name"]
            f = LabelledField(folder / "images" / name, lab,
                              _iml_split(name) if lab == "IML" else name.split("/")[0],
                              labelled=("red cell",) if lab == "IML" else KINDS, border_boxed=lab != "IML")
            for o in rec.get("objects", []):
                t = o.get("type")
                if t == "difficult":
                    f.ignore.append(box_of(o))
                elif t in TYPE_KIND:
                    f.boxes.append(box_of(o))
                    f.kinds.append(TYPE_KIND[t])
                    f.stages.append(t if t in INFECTED_TYPES else None)
            out.append(f)
    return out


def detector_split(fields: list[LabelledField]) -> tuple[list[LabelledField], list[LabelledField]]:
    """(train, val): IML PA171690-769 + TXL-PBC train; IML PA171770-799 + TXL-PBC val. Held-out fields
    are in neither."""
    return [f for f in fields if f.split == "train"], [f for f in fields if f.split == "val"]

"""Annotated fields of several labs as objects (red cell, white cell, platelet) for the detector, with
the splits it is trained and chosen on. Torch-free.

    fields = labelled_fields("../shared/data")          # every annotated field of IML and TXL-PBC
    train, val = detector_split(fields)                  # by block and by the dataset's own split

Labs and splits (never at random: neighbouring IML image numbers are likely the same slide):
- IML_Malaria: PA171690-769 train, PA171770-799 validation (the detector's split and train-heads' default;
  train-heads --iml-learn / --iml-choose move the line within PA171690-829), PA171830-899 held out
  (labelled "held-out", never learnt from nor chosen on: `iml_block` refuses a block that reaches it).
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
IML_HELD_OUT_FROM = 171830  # PA171830-899: never learnt from nor chosen on


def iml_block(text: str) -> range:
    """'PA171770-799' (or '171770-171799') -> the image numbers it names, refused where it reaches the
    held-out block or is not a block."""
    t = text.strip().upper().removeprefix("PA")
    try:
        a, b = t.split("-")
        b = b.strip().removeprefix("PA")
        if not a.strip() or not b:
            raise ValueError
        lo = int(a)
        hi = int(a[: len(a) - len(b)] + b) if len(b) < len(a) else int(b)
    except ValueError:
        raise ValueError(f"{text!r} is not an IML block (e.g. PA171770-799)") from None
    if hi < lo:
        raise ValueError(f"{text!r}: the block ends before it starts")
    if lo < IML_TRAIN.start:
        raise ValueError(f"{text!r}: the IML fields are numbered from PA{IML_TRAIN.start}")
    if hi >= IML_HELD_OUT_FROM:
        raise ValueError(f"{text!r} reaches PA{IML_HELD_OUT_FROM}-899, the held-out block, which no choice may read")
    return range(lo, hi + 1)


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


def iml_number(name: str) -> int:
    """PA171770.jpg -> 171770 (-1 for a name without an image number)."""
    stem = Path(name).stem[2:8]
    return int(stem) if stem.isdigit() else -1


def _iml_split(name: str, learn: range, choose: range) -> str:
    n = iml_number(name)
    return "train" if n in learn else "val" if n in choose else "held-out"


def labelled_fields(data_root: str | Path, iml_learn: range = IML_TRAIN,
                    iml_choose: range = IML_VAL) -> list[LabelledField]:
    """The annotated fields of ../shared/data (IML_Malaria and TXL-PBC) that are there; IML fields split
    into `iml_learn` (train), `iml_choose` (val) and the rest (held-out)."""
    if set(iml_learn) & set(iml_choose):
        raise ValueError("the IML blocks to learn from and to choose on overlap")
    if max([*iml_learn, *iml_choose], default=0) >= IML_HELD_OUT_FROM:
        raise ValueError(f"PA{IML_HELD_OUT_FROM}-899 is held out: never learnt from nor chosen on")
    root = Path(data_root)
    out = []
    sources = [("IML", root / "iml-fields"), ("TXL-PBC", root / "txl-pbc")]
    for lab, folder in sources:
        if not (folder / "annotations.json").is_file():
            continue
        for rec in load_annotations(folder / "annotations.json"):
            name = rec["image_name"]
            f = LabelledField(folder / "images" / name, lab,
                              _iml_split(name, iml_learn, iml_choose) if lab == "IML" else name.split("/")[0],
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

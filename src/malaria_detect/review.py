"""A person's review of the model's calls, and the reviewed field records the counting rule counts.

A review is a list of decisions, each on one object of one stored field (its `cell` key: the object's
index in the field record, as a string, or "a<id>" for an infected cell the person added):

    confirm   the cell is parasitized, as called (its stage kept)
    reject    the cell is not parasitized: counted as uninfected
    stage     the cell is parasitized, at this stage (re-staged; also calls an uninfected cell)
    add       a missed infected cell: at a point inside a red cell the model called uninfected, that cell
              is called parasitized; on an object it took for a white cell or platelet, that object is an
              infected red cell; elsewhere a new red cell (a box of the field's red-cell size) is added
    clear     withdraw the decision on this cell (an added cell is removed)
    seen      (the whole field, cell "field") the person looked at it: a field with no call, or whose calls
              are as the other decisions leave them, is reviewed (what makes a negative slide reviewed)

The latest decision on a cell wins; every decision is kept with who made it and when (store.py). The
reviewed records are the model's with the decisions applied and their counts made again by
counting.field_counts, so the model's counts and the reviewed counts come from one rule.
"""

from __future__ import annotations

import math
import re
import statistics

from .counting import field_counts, is_red_cell
from .errors import MalariaDetectError

ACTIONS = ("confirm", "reject", "stage", "add", "clear", "seen")
STAGES = ("ring", "trophozoite", "schizont", "gametocyte")
MAX_REVIEWER = 80


class ReviewError(MalariaDetectError, ValueError):
    """A decision that cannot be applied (unknown action or stage, no such cell, a point outside the field)."""


def is_called(cell: dict, positive: str) -> bool:
    """A red cell the model called parasitized (what a person confirms or rejects)."""
    return is_red_cell(cell) and cell.get("label") == positive and not cell.get("ood")


def check(decision: dict, field: dict, in_force: dict[str, dict] | None = None) -> dict:
    """A decision as it is stored: {"cell", "action", "stage", "box"}; raises ReviewError when it does not
    fit `field` (the stored record) and the decisions `in_force` on it (latest()). An `add` at a point is
    resolved here: into the red cell under it, or a new box centred on it. A confirm naming another stage
    than the cell's is a re-stage; a reject carries no stage."""
    action, stage = decision.get("action"), decision.get("stage") or None
    if action not in ACTIONS:
        raise ReviewError(f"unknown review action {action!r}: one of {', '.join(ACTIONS)}")
    if stage is not None and stage not in STAGES:
        raise ReviewError(f"unknown stage {stage!r}: one of {', '.join(STAGES)}")
    if action == "stage" and stage is None:
        raise ReviewError("a 'stage' decision needs the stage")
    if field.get("error"):
        raise ReviewError(f"field {field.get('image')} was not analysed: nothing to review")
    cells = field["cells"]
    if action == "add":
        return _add(decision, field, stage, in_force or {})
    if action == "seen":
        return {"cell": "field", "action": "seen", "stage": None, "box": None}
    cell = str(decision.get("cell", ""))
    if re.fullmatch(r"a[0-9]{1,12}", cell):
        if action not in ("clear", "reject"):
            raise ReviewError("an added cell can only be withdrawn (clear or reject)")
        return {"cell": f"a{int(cell[1:])}", "action": "clear", "stage": None, "box": None}
    if not re.fullmatch(r"[0-9]{1,9}", cell) or int(cell) >= len(cells):
        raise ReviewError(f"field {field.get('image')} has no object {cell!r} (it has {len(cells)})")
    c = cells[int(cell)]
    if not is_red_cell(c) and action not in ("confirm", "stage"):  # a person may call it an infected red cell
        raise ReviewError(f"object {cell} of {field.get('image')} is a {c['kind']}, not a red cell: it can be "
                          "called an infected red cell (confirm, stage), not rejected")
    if action == "confirm" and stage is not None:
        action, stage = ("confirm", None) if stage == c.get("stage") else ("stage", stage)
    if action in ("reject", "clear"):
        stage = None
    return {"cell": str(int(cell)), "action": action, "stage": stage, "box": None}


def _inside(box, x: float, y: float) -> bool:
    return box[0] <= x <= box[2] and box[1] <= y <= box[3]


def _add(decision: dict, field: dict, stage: str | None, in_force: dict[str, dict]) -> dict:
    try:
        x, y = float(decision["x"]), float(decision["y"])
    except (KeyError, TypeError, ValueError):
        raise ReviewError("an 'add' decision needs the point clicked: x and y in field pixels") from None
    if not (math.isfinite(x) and math.isfinite(y) and 0 <= x < field["width"] and 0 <= y < field["height"]):
        raise ReviewError(f"({x:.0f}, {y:.0f}) is outside the field ({field['width']} x {field['height']})")
    reds = [(i, c) for i, c in enumerate(field["cells"]) if is_red_cell(c)]
    under = [(i, c) for i, c in reds if _inside(c["box"], x, y)]
    if under:  # the smallest red cell under the point: it was missed (or flagged): call it
        i, c = min(under, key=lambda t: (t[1]["box"][2] - t[1]["box"][0]) * (t[1]["box"][3] - t[1]["box"][1]))
        return {"cell": str(i), "action": "stage" if stage and stage != c.get("stage") else "confirm",
                "stage": stage if stage and stage != c.get("stage") else None, "box": None}
    for d in in_force.values():
        if d["action"] == "add" and _inside(d["box"], x, y):
            raise ReviewError("an infected cell was already added there (undo it to place it again)")
    other = next((i for i, c in enumerate(field["cells"]) if not is_red_cell(c) and _inside(c["box"], x, y)), None)
    if other is not None:  # the model took it for a white cell or a platelet: the person calls it an infected red cell
        return {"cell": str(other), "action": "stage" if stage else "confirm", "stage": stage, "box": None}
    sides = [max(c["box"][2] - c["box"][0], c["box"][3] - c["box"][1]) for _, c in reds]
    r = (statistics.median(sides) if sides else min(field["width"], field["height"]) / 12) / 2
    box = [max(0, round(x - r)), max(0, round(y - r)), min(field["width"], round(x + r)),
           min(field["height"], round(y + r))]
    return {"cell": None, "action": "add", "stage": stage, "box": box}


def latest(decisions: list[dict]) -> dict[str, dict]:
    """The decisions in force on one field: cell key -> the latest decision on it (in `decisions` order,
    oldest first; each with its `id`). An added cell's key is "a<id>"; cleared cells are left out."""
    out: dict[str, dict] = {}
    for d in decisions:
        key = f"a{d['id']}" if d["action"] == "add" else str(d["cell"])
        if re.fullmatch(r"[0-9]+", key):  # decisions kept before cell keys were normalised ("0048" is 48)
            key = str(int(key))
        if d["action"] == "clear":
            out.pop(key, None)
        else:
            out[key] = d
    return out


def apply(field: dict, decisions: list[dict], positive: str, negative: str) -> dict:
    """The field record as reviewed: its objects with the decisions in force, its counts made again."""
    if field.get("error"):
        return field
    cells = [dict(c) for c in field["cells"]]
    for key, d in latest(decisions).items():
        if d["action"] == "seen":
            continue
        if d["action"] == "add":
            cells.append({"box": d["box"], "kind": "red cell", "label": positive, "ood": False,
                          "p_parasitized": None, "stage": d.get("stage"), "key": key, "review": "added"})
            continue
        c = cells[int(key)]
        if d["action"] == "reject":  # the model's call undone: uninfected; a cell it did not call stays as it was
            if is_called(c, positive):
                c.update(label=negative, stage=None, review="rejected")
        else:  # parasitized; an object the model took for another kind becomes a red cell
            stage = d.get("stage") or c.get("stage")
            review = "added" if not is_called(c, positive) else \
                "restaged" if stage != c.get("stage") else "confirmed"
            c.update(kind="red cell", label=positive, ood=False, review=review, stage=stage)
    return field | {"cells": cells} | field_counts(cells, positive)


def status(fields: list[dict], decisions: list[dict], positive: str) -> dict:
    """Who reviewed, when, and how far: `reviewed` when any decision is in force (a field marked seen
    included), `complete` when, besides, every cell the model called has one. Tallies by what the
    decisions in force do to the model's calls: confirmed (as called), rejected, re-staged; added: cells
    the model did not call, called by the person."""
    by_field: dict[int, list[dict]] = {}
    for d in decisions:
        by_field.setdefault(d["field_id"], []).append(d)
    n_called = n_decided = n_force = 0
    tally = {"confirmed": 0, "rejected": 0, "restaged": 0, "added": 0}
    for f in fields:
        if f.get("error"):
            continue
        now = latest(by_field.get(f.get("field_id"), []))
        n_force += len(now)
        called = {str(i) for i, c in enumerate(f["cells"]) if is_called(c, positive)}
        n_called += len(called)
        n_decided += len(called & now.keys())
        for key, d in now.items():
            if d["action"] == "seen":
                continue
            if key not in called:
                tally["added"] += d["action"] != "reject"  # a reject of a cell the model did not call changes nothing
            elif d["action"] == "reject":
                tally["rejected"] += 1
            elif d.get("stage") not in (None, f["cells"][int(key)].get("stage")):  # confirm or stage
                tally["restaged"] += 1
            else:
                tally["confirmed"] += 1
    reviewers = sorted({d["reviewer"] for d in decisions})
    return {"reviewed": n_force > 0, "complete": n_force > 0 and n_decided == n_called,
            "n_called": n_called, "n_decided": n_decided, **{f"n_{k}": v for k, v in tally.items()},
            "reviewers": reviewers, "first": min((d["created"] for d in decisions), default=None),
            "last": max((d["created"] for d in decisions), default=None)}


def status_text(s: dict) -> str:
    """One line for the report and the terminal."""
    if not s["reviewed"]:
        return "not reviewed: the calls are the model's"
    done = "complete" if s["complete"] else f"{s['n_decided']} of {s['n_called']} called cells decided"
    return (f"reviewed by {', '.join(s['reviewers'])} ({s['last']}): {done}; {s['n_confirmed']} confirmed, "
            f"{s['n_rejected']} rejected, {s['n_restaged']} re-staged, {s['n_added']} added")


def from_annotations(field: dict, annotated: dict, positive: str) -> list[dict]:
    """The decisions a person holding these annotations would make on a field record (an annotated field
    of the IML / TXL-PBC format or COCO, data.annotations): every red cell matched to an infected box
    called parasitized at its annotated stage (a generic "parasitized" box keeps the model's stage), every
    other call rejected, every infected box matched to no red cell added at its centre, and the field
    marked seen. Boxes are matched as data.annotations.match_cells matches them (IoU >= 0.5, >= 0.3 for
    an infected box); a call on a box marked "difficult" is matched to nothing, so rejected."""
    from .data.annotations import INFECTED_TYPES, UNINFECTED_TYPES, box_of, match_cells

    infected_types = INFECTED_TYPES | {"parasitized"}
    objs = [o for o in annotated.get("objects", []) if o.get("type") in infected_types | UNINFECTED_TYPES]
    boxes, infected = [box_of(o) for o in objs], [o["type"] in infected_types for o in objs]
    reds = [i for i, c in enumerate(field["cells"]) if is_red_cell(c)]
    pairs = match_cells([tuple(map(float, field["cells"][i]["box"])) for i in reds], boxes, infected)
    truth = {reds[k]: j for k, j in pairs.items()}
    out, found = [], set()
    for i in reds:
        c, j = field["cells"][i], truth.get(i)
        if j is not None and infected[j]:
            found.add(j)
            stage = objs[j]["type"] if objs[j]["type"] in STAGES else None
            out.append({"cell": str(i), "action": "stage" if stage else "confirm", "stage": stage})
        elif is_called(c, positive):
            out.append({"cell": str(i), "action": "reject"})
    for j, (b, inf) in enumerate(zip(boxes, infected)):
        if inf and j not in found:
            x, y = min(field["width"] - 1, (b[0] + b[2]) / 2), min(field["height"] - 1, (b[1] + b[3]) / 2)
            stage = objs[j]["type"] if objs[j]["type"] in STAGES else None
            out.append({"action": "add", "x": x, "y": y, "stage": stage})
    return out + [{"action": "seen"}]

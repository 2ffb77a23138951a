"""A whole-field report written as a table: one CSV row per object (red cells, white cells, platelets,
other objects), with the stage of a parasitized red cell and, where the second opinion was asked, the
cell head's p (record.second_opinion)."""

from __future__ import annotations

import csv

from ..tables import csv_safe

CSV_FIELDS = ["image", "cell", "x0", "y0", "x1", "y1", "label", "p_parasitized", "ood", "border", "kind", "stage",
              "p_stage", "p_cell_head"]


def write_csv(report: dict, path) -> None:
    """One row per cell (strings only in CSV)."""
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for fld in report["fields"]:
            for i, c in enumerate(fld["cells"]):
                w.writerow({"image": csv_safe(fld["image"]), "cell": i, "x0": c["box"][0], "y0": c["box"][1],
                            "x1": c["box"][2], "y1": c["box"][3], "label": c["label"] or "",
                            "p_parasitized": "" if c["p_parasitized"] is None else f"{c['p_parasitized']:.6f}",
                            "ood": str(c["ood"]).lower(), "border": str(c["border"]).lower(),
                            "kind": c.get("kind", "red cell"), "stage": c.get("stage") or "",
                            "p_stage": "" if c.get("p_stage") is None else f"{c['p_stage']:.4f}",
                            "p_cell_head": "" if c.get("p_cell_head") is None else f"{c['p_cell_head']:.6f}"})

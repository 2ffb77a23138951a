"""Ray Data batch screening (the [scale] extra) on a local Ray with 2 CPUs: the same rows as the
single-process path, URIs, Parquet, a worker that dies, whole fields. Skipped without ray."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT, SAMPLES

from malaria_detect.imaging import iter_image_paths

_no_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                             reason="ray is not installed: pip install -e '.[scale]' (make test installs it)")


def needs_ray(test):
    return pytest.mark.ray(_no_ray(test))


@pytest.fixture(scope="module")
def ray_local():
    """One local Ray for the module (2 CPUs, as on this machine), shut down after it."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             logging_level="warning")
    yield ray
    ray.shutdown()


def cells(n_each=16):
    """A few dozen real sample cells of both classes, in the order `predict` lists them."""
    return [str(p) for d in ("Parasitized", "Uninfected") for p in list(iter_image_paths([SAMPLES / d]))[:n_each]]


def same(single, distributed):
    assert [r.source for r in distributed] == [r.source for r in single]
    for a, b in zip(single, distributed):
        assert (b.label, b.ood, b.error) == (a.label, a.ood, a.error), (a, b)
        if a.p_parasitized is not None:
            assert abs(a.p_parasitized - b.p_parasitized) <= 1e-5 and abs(a.ood_score - b.ood_score) <= 1e-4


@needs_ray
def test_same_rows_as_the_single_process_path(ray_local, bundled, tmp_path):
    from malaria_detect.scale import predict_ray

    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    paths = cells() + [str(tmp_path / "missing.png"), str(bad)]
    got = predict_ray(paths, address="local", batch_size=8, progress=False)
    single = bundled.predict(paths)
    same(single, got)
    assert [r.row() for r in got][-2:] == [r.row() for r in single][-2:]  # error rows, word for word
    assert {r.label for r in got[:32]} == {"Parasitized", "Uninfected"}


@needs_ray
def test_uri_inputs_and_parquet_output(ray_local, bundled, tmp_path):
    import pyarrow.parquet as pq

    from malaria_detect.scale import list_sources, predict_ray

    src = tmp_path / "bucket" / "slide"
    (src / "sub").mkdir(parents=True)
    local = cells(4)
    for i, p in enumerate(local):
        shutil.copy(p, (src / "sub" if i % 2 else src) / os.path.basename(p))
    uri = f"file://{src}"
    rows, _ = list_sources([uri, uri + "/gone.png"])
    assert len(rows) == 9 and all(r["name"].startswith(uri) for r in rows)
    got = predict_ray([uri, uri + "/gone.png"], address="local", batch_size=4, parquet=str(tmp_path / "pq"),
                      progress=False)
    by_name = {os.path.basename(r.source): r for r in got[:8]}
    for a in bundled.predict(local):
        b = by_name[os.path.basename(a.source)]
        assert b.label == a.label and abs(b.p_parasitized - a.p_parasitized) <= 1e-5
    assert got[-1].error == "file not found" and got[-1].source == uri + "/gone.png"
    table = pq.read_table(tmp_path / "pq")
    assert sorted(table.column("idx").to_pylist()) == list(range(9))  # every input, once
    assert set(table.column_names) >= {"path", "label", "p_parasitized", "ood", "ood_score", "error"}


@needs_ray
def test_a_dead_worker_is_retried_and_no_row_is_lost(ray_local, bundled, tmp_path):
    from malaria_detect import scale

    paths = [str(shutil.copy(p, tmp_path / f"{i:02d}{ {2: '_once', 9: '_poison'}.get(i, '')}.webp"))
             for i, p in enumerate(cells(6))]
    marks = str(tmp_path)

    def die(names):  # runs in the Ray worker: kills it once for "_once", every time for "_poison"
        for n in names:
            if n.endswith("_once.webp") and not os.path.exists(marks + "/died"):
                open(marks + "/died", "w").close()
                os._exit(1)
            if n.endswith("_poison.webp"):
                os._exit(1)

    got = scale.predict_ray(paths, address="local", batch_size=4, progress=False, retries=1, _fault_hook=die)
    single = bundled.predict(paths)
    assert os.path.exists(marks + "/died")                            # the worker died once ...
    assert got[2].error is None and got[2].label == single[2].label   # ... and Ray retried its batch
    assert got[9].error == scale.LOST and got[9].source == paths[9]   # a file that always kills: its error row
    same(single[:9] + single[10:], got[:9] + got[10:])                # its neighbours were run again, one by one


@needs_ray
def test_cli_predict_with_ray_writes_the_same_csv(ray_local, tmp_path, capsys):
    import csv

    import pyarrow.parquet as pq

    from malaria_detect import cli

    folder = tmp_path / "cells"
    folder.mkdir()
    for p in cells(8):
        shutil.copy(p, folder)
    (folder / "notes.png").write_text("not an image")
    # notes.png cannot be read: exit status 1 on both paths, after every row was written
    assert cli.main(["predict", str(folder), "--csv", str(tmp_path / "one.csv")]) == 1
    assert cli.main(["predict", str(folder), "--csv", str(tmp_path / "ray.csv"), "--ray", "local",
                     "--parquet", str(tmp_path / "pq")]) == 1
    one, dist = (list(csv.DictReader(open(tmp_path / f"{n}.csv"))) for n in ("one", "ray"))
    assert len(one) == 17 and [r["path"] for r in dist] == [r["path"] for r in one]
    for a, b in zip(one, dist):
        assert (b["label"], b["ood"], b["error"]) == (a["label"], a["ood"], a["error"])
        assert a["error"] or abs(float(a["p_parasitized"]) - float(b["p_parasitized"])) <= 1e-5
    assert pq.read_table(tmp_path / "pq").num_rows == 17
    assert "17 images" in capsys.readouterr().out


def test_cli_refuses_ray_options_that_do_not_go_together(tmp_path):
    from malaria_detect import cli

    with pytest.raises(SystemExit, match="--heatmaps is not available with --ray"):
        cli.main(["predict", str(SAMPLES), "--ray", "local", "--heatmaps", str(tmp_path / "h")])
    with pytest.raises(SystemExit, match="go with --ray"):
        cli.main(["predict", str(SAMPLES), "--parquet", str(tmp_path / "pq")])
    assert not (tmp_path / "h").exists()


FIELDS = ROOT / "samples" / "fields"


@needs_ray
@pytest.mark.skipif(not FIELDS.is_dir(), reason="no sample fields in samples/fields")
def test_fields_on_ray_match_the_single_process_path(ray_local, bundled, tmp_path):
    smear = pytest.importorskip("malaria_detect.fields.analysis")
    import pyarrow.parquet as pq

    from malaria_detect.scale import analyze_fields_ray

    fields = sorted(str(p) for p in FIELDS.glob("*.JPG"))[:2] + [str(tmp_path / "missing.jpg")]
    got = analyze_fields_ray(fields, address="local", parquet=str(tmp_path / "pq"), progress=False)
    single = smear.analyze_fields(bundled, fields)
    assert [f["image"] for f in got["fields"]] == fields
    for a, b in zip(single["fields"], got["fields"]):
        a, b = dict(a), dict(b)
        a.pop("seconds", None), b.pop("seconds", None)
        pa_, pb = [c.pop("p_parasitized") for c in a["cells"]], [c.pop("p_parasitized") for c in b["cells"]]
        assert a == b and all(x == y or abs(x - y) <= 1e-5 for x, y in zip(pa_, pb))  # None: a white cell
    assert got["fields"][0]["n_cells"] > 20 and "error" in got["fields"][-1]
    assert got["summary"] == single["summary"] and got["model"] == single["model"]
    assert sorted(pq.read_table(tmp_path / "pq").column("idx").to_pylist()) == [0, 1, 2]


def test_the_single_machine_path_never_imports_ray(tmp_path):
    one = next(iter_image_paths([SAMPLES / "Parasitized"]))
    code = ("import sys; from malaria_detect import cli; "
            f"rc = cli.main(['predict', {str(one)!r}, '--csv', {str(tmp_path / 'out.csv')!r}]); "
            "print(rc, 'ray' in sys.modules, 'malaria_detect.scale' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.split()[-3:] == ["0", "False", "False"], out.stdout + out.stderr


def test_a_bad_address_is_refused_before_anything_starts():
    from malaria_detect.scale import connect

    with pytest.raises(ValueError, match="local, auto or ray://"):
        connect("http://head:8265")


@needs_ray
@pytest.mark.skipif(not FIELDS.is_dir(), reason="no sample fields in samples/fields")
def test_cli_smear_with_ray_writes_the_same_report(ray_local, tmp_path):
    import json

    from malaria_detect import cli

    args = ["smear", str(sorted(FIELDS.glob("*.JPG"))[0]), str(tmp_path / "missing.jpg")]
    assert cli.main(args + ["--json", str(tmp_path / "one.json")]) == 1  # 1: a field could not be read
    assert cli.main(args + ["--json", str(tmp_path / "ray.json"), "--ray", "local"]) == 1
    one, dist = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "ray"))
    probs = []
    for report in (one, dist):
        for f in report["fields"]:
            f.pop("seconds", None)
        probs.append([c.pop("p_parasitized") for f in report["fields"] for c in f["cells"]])
    assert dist == one and len(probs[0]) > 20
    assert all(abs(x - y) <= 1e-5 for x, y in zip(*probs) if x is not None)
    with pytest.raises(SystemExit, match="--overlays is not available with --ray"):
        cli.main(args + ["--ray", "local", "--overlays", str(tmp_path / "o")])

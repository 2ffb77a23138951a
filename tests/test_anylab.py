"""The whole-field default model ('anylab': every object of a field, the stage of a parasitized cell) on
real fields of two labs: the committed TXL-PBC validation sample (malaria-free, white cells and
platelets boxed) and the IML sample fields; and the record's rules for kinds and stages."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from malaria_detect.record import KIND_MIN_P, Record, RecordError

ROOT = Path(__file__).resolve().parents[1]
TXL = ROOT / "samples" / "txl-pbc"
IML = ROOT / "samples" / "fields"


@pytest.fixture(scope="module")
def anylab():
    from malaria_detect.cells.predictor import Predictor

    return Predictor.load("anylab")


@pytest.fixture(scope="module")
def txl_report(anylab):
    from malaria_detect.fields.analysis import analyze_fields

    return analyze_fields(anylab, [TXL / "val"])


def test_the_field_default_is_the_any_lab_model_with_its_detector():
    from malaria_detect.fields.analysis import SmearOptions
    from malaria_detect.modelfile import BUNDLED_NAMES, bundled_field_model_path

    assert bundled_field_model_path().name == BUNDLED_NAMES["anylab"]
    assert SmearOptions().detector == "bundled"


def test_malaria_free_fields_of_another_lab_read_negative_and_white_cells_are_found(txl_report):
    from malaria_detect.evaluation.fieldscore import load_annotations, score_fields

    s = score_fields(txl_report, load_annotations(TXL / "annotations.json"))
    assert s["fields"] == 4 and s["n_classified"] > 50
    assert s["det_f1"] > 0.85
    assert s["fp_per_1000"] == 0 and txl_report["summary"]["n_parasitized"] == 0
    assert s["wbc_called_parasitized"] == [0, 4] and s["platelets_called_parasitized"][0] == 0
    assert s["wbc_recall"] >= 0.75
    summary = txl_report["summary"]
    assert summary["n_white_cells"] >= 3 and summary["n_platelets"] >= 4 and summary["n_by_stage"] == {}
    for f in txl_report["fields"]:
        for c in f["cells"]:
            if c["kind"] != "red cell":
                assert c["label"] is None and c["p_parasitized"] is None and "stage" not in c


def test_parasitized_cells_carry_their_stage_and_are_counted_by_stage(anylab):
    from malaria_detect.fields.analysis import analyze_fields

    rep = analyze_fields(anylab, [IML])
    called = [c for f in rep["fields"] for c in f["cells"]
              if c.get("label") == "Parasitized" and not c["ood"]]
    assert called, "the IML sample fields hold infected cells"
    assert all(c["stage"] in anylab.record.stage_names and 0 < c["p_stage"] <= 1 for c in called)
    by_stage = rep["summary"]["n_by_stage"]
    assert sum(by_stage.values()) == rep["summary"]["n_parasitized"] == len(called)
    for f in rep["fields"]:
        assert sum(f["n_by_stage"].values()) == f["n_parasitized"]


def test_single_cells_get_a_kind_and_parasitized_ones_a_stage(anylab, samples):
    preds = anylab.predict([samples / "Parasitized", samples / "Uninfected"])
    kinds = [p.kind for p in preds]
    assert kinds.count("red cell") / len(kinds) > 0.95  # NIH crops are red cells
    for p in preds:
        assert (p.stage is not None) == (p.label == "Parasitized")
        row = p.row()
        assert row["kind"] == p.kind and row["stage"] == (p.stage or "")


def test_a_model_without_object_heads_calls_every_object_a_red_cell():
    from malaria_detect.cells.predictor import Predictor

    pred = Predictor.load("robust")
    z, cam, ood, zk, zs = pred.run_all(np.zeros((2, 112, 112, 3), np.uint8))
    assert zk is None and zs is None
    kinds, p = pred.record.kinds(zk)
    assert list(kinds) == [] and pred.record.kinds(np.zeros((3, 4)))[0].tolist() == ["red cell"] * 3


def _record(**kw):
    return Record("efficientnet_lite0", 112, (0.5,) * 3, (0.5,) * 3, **kw).validate()


def test_kind_rule_keeps_a_red_cell_unless_another_kind_is_likely():
    r = _record(kind_names=("red cell", "white cell", "platelet", "other"))
    sure = np.log(3 * KIND_MIN_P / (1 - KIND_MIN_P)) + 0.5  # softmax against three logits of 0
    logits = np.array([[0.0, sure, 0, 0], [0.0, 0.4, 0, 0], [3.0, 0, 0, 0]])
    kinds, p = r.kinds(logits)
    assert kinds.tolist() == ["white cell", "red cell", "red cell"]
    assert p[0] >= KIND_MIN_P
    assert Record.from_json(r.to_json()).kind_names == r.kind_names


@pytest.mark.parametrize("kw", [{"kind_names": ("white cell", "red cell")}, {"kind_names": ("red cell", "red cell")},
                                {"stage_names": ("ring", "")}, {"stage_names": "ring"}])
def test_bad_kind_or_stage_names_are_refused(kw):
    with pytest.raises(RecordError):
        _record(**kw)


def test_a_record_that_names_more_kinds_than_the_graph_has_is_refused(tmp_path):
    import shutil

    from malaria_detect.cells.predictor import Predictor
    from malaria_detect.errors import ModelError
    from malaria_detect.modelfile import bundled_field_model_path, write_model_record

    copy = tmp_path / "m.onnx"
    shutil.copy(bundled_field_model_path(), copy)
    record = Predictor.load(copy).record
    record.kind_names = ("red cell", "white cell", "platelet")
    write_model_record(copy, record)
    with pytest.raises(ModelError, match="names 3 kinds but the graph's kind_logits output has 4"):
        Predictor.load(copy)


def test_the_recipe_is_in_the_package_and_its_commands_exist(capsys):
    from malaria_detect.cli import build_parser, main

    assert main(["recipe"]) == 0 and "anylab" in capsys.readouterr().out
    assert main(["recipe", "anylab"]) == 0
    out = capsys.readouterr().out
    commands = [line.split()[1] for line in out.splitlines() if line.startswith("malaria-detect ")]
    assert commands == ["train-heads", "field-threshold"]
    _, commands_known = build_parser()
    assert set(commands) <= set(commands_known)
    with pytest.raises(SystemExit, match="no recipe"):
        main(["recipe", "nope"])


def test_field_threshold_refuses_a_bundled_model_and_relabels_by_the_record():
    from malaria_detect.cells.predictor import Predictor
    from malaria_detect.cli import main
    from malaria_detect.evaluation.operating import relabel
    from malaria_detect.modelfile import bundled_field_model_path

    with pytest.raises(SystemExit, match="is a bundled model"):
        main(["field-threshold", str(bundled_field_model_path())])
    record = Predictor.load("anylab").record
    cells = [{"kind": "red cell", "box": [0, 0, 9, 9], "label": "Uninfected", "p_parasitized": 0.7, "ood": False},
             {"kind": "white cell", "box": [20, 0, 29, 9], "label": None, "p_parasitized": None, "ood": False}]
    low, high = (relabel({"fields": [{"image": "f", "cells": cells}]}, t, record)["fields"][0] for t in (0.5, 0.9))
    assert low["n_parasitized"] == 1 and high["n_parasitized"] == 0 and low["n_white_cells"] == 1


def test_iml_blocks_are_named_refused_at_the_held_out_block_and_never_overlap(tmp_path):
    import shutil

    from malaria_detect.data.objects import iml_block, labelled_fields
    from malaria_detect.errors import UsageError
    from malaria_detect.evaluation.operating import choose_field_threshold
    from malaria_detect.modelfile import bundled_field_model_path

    assert iml_block("PA171690-799") == range(171690, 171800) == iml_block("171690-171799")
    assert iml_block("PA171770-PA171799") == iml_block("PA171770-99") == range(171770, 171800)
    for bad, why in (("PA171800-899", "held-out"), ("PA171800-700", "ends before"), ("seven", "not an IML block"),
                     ("PA171770-", "not an IML block"), ("1-5", "numbered from")):
        with pytest.raises(ValueError, match=why):
            iml_block(bad)
    data = tmp_path / "data" / "iml-fields"  # the committed sample fields: PA171700, 710, 771, 772
    data.mkdir(parents=True)
    (data / "images").symlink_to(ROOT / "samples" / "fields")
    (data / "annotations.json").symlink_to(ROOT / "samples" / "fields" / "annotations.json")
    split = {f.path.stem: f.split for f in labelled_fields(tmp_path / "data")}
    assert split == {"PA171700": "train", "PA171710": "train", "PA171771": "val", "PA171772": "val"}
    split = {f.path.stem: f.split for f in labelled_fields(tmp_path / "data", iml_block("PA171690-771"),
                                                           iml_block("PA171772-829"))}
    assert split == {"PA171700": "train", "PA171710": "train", "PA171771": "train", "PA171772": "val"}
    with pytest.raises(ValueError, match="overlap"):
        labelled_fields(tmp_path / "data", iml_block("PA171690-799"), iml_block("PA171790-829"))
    with pytest.raises(ValueError, match="held out"):
        labelled_fields(tmp_path / "data", range(171690, 171800), range(171800, 171840))
    # the whole-field threshold is never chosen on fields the model learnt from (the bundled one: PA171690-769)
    model = tmp_path / "m.onnx"
    shutil.copy(bundled_field_model_path(), model)
    with pytest.raises(UsageError, match="learnt from IML PA171690-769"):
        choose_field_threshold(model, tmp_path / "data", iml="PA171760-789", progress=False)
    with pytest.raises(UsageError, match="held-out"):
        choose_field_threshold(model, tmp_path / "data", iml="PA171820-839", progress=False)


def test_a_fields_objects_run_a_graph_pruned_to_the_whole_field_outputs(tmp_path):
    """The bundled graph's whole-field outputs from a session of the graph pruned to them (modelfile.
    pruned_graph) are the full graph's, and the pruned graph holds neither the cell head nor its stages."""
    import onnxruntime as ort
    from PIL import Image

    from malaria_detect.cells.predictor import Predictor
    from malaria_detect.fields.crops import box_crops
    from malaria_detect.fields.segment import Cell
    from malaria_detect.imaging import normalize
    from malaria_detect.modelfile import OBJECT_OOD, bundled_field_model_path, pruned_graph

    pred = Predictor.load("anylab")
    rgb = np.asarray(Image.open(IML / "PA171771.JPG").convert("RGB"))
    cells = [Cell((x, y, x + 70, y + 70), np.ones((70, 70), bool), 4900, False) for x in range(0, 1200, 150)
             for y in (100, 400, 700)]
    x = box_crops(rgb, cells, pred.record.input_size)
    names = ["object_logits", OBJECT_OOD, "kind_logits", "stage_logits"]
    full = pred.session.run([*names, "ood_score"], {"image": normalize(x, pred.record)})
    z, cam, ood, zk, zs = pred.run_fields(x)
    assert cam is None
    for got, want in zip((z, ood, zk, zs), full):
        assert np.allclose(got, want, atol=1e-5)
    assert (ood <= full[4] + 1e-5).all()  # the tapped layers alone, without the view check
    blob = pruned_graph(bundled_field_model_path().read_bytes(), names)
    small = ort.InferenceSession(blob, providers=["CPUExecutionProvider"])
    assert sorted(o.name for o in small.get_outputs()) == sorted(names)
    assert len(blob) < 0.6 * bundled_field_model_path().stat().st_size  # the cell head's stages are gone (14 of 26 MB)
    with pytest.raises(ValueError, match="no output"):
        pruned_graph(bundled_field_model_path().read_bytes(), ["nope"])
    # the segmenter's masked crops ask for the full score, view check included (and get the CAM with it)
    z2, cam2, ood2, _, _ = pred.run_fields(x, view_check=True)
    assert cam2 is not None and np.allclose(ood2, full[4], atol=1e-5) and np.allclose(z2, z, atol=1e-5)
    # the server's field workers share one Predictor: its pruned session is made once, whoever asks first
    from concurrent.futures import ThreadPoolExecutor

    fresh = Predictor.load("anylab")
    with ThreadPoolExecutor(4) as ex:
        runs = list(ex.map(lambda _: fresh.run_fields(x), range(4)))
    assert all(np.allclose(r[0], z, atol=1e-5) and np.allclose(r[2], ood, atol=1e-5) for r in runs)


def test_a_pruned_graph_keeps_only_what_its_outputs_need(tmp_path):
    """modelfile.pruned_graph on a graph that lists its weights as inputs too (older exporters do): a
    weight, and its input, that only a dropped output reads go with it."""
    onnx = pytest.importorskip("onnx")
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from malaria_detect.modelfile import pruned_graph

    w1, w2 = (numpy_helper.from_array(np.full((1, 2), v, np.float32), n) for v, n in ((2.0, "w1"), (3.0, "w2")))
    vi = lambda n: helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 2])  # noqa: E731
    g = helper.make_graph([helper.make_node("Mul", ["x", "w1"], ["a"]), helper.make_node("Mul", ["x", "w2"], ["b"])],
                          "g", [vi("x"), vi("w1"), vi("w2")], [vi("a"), vi("b")], [w1, w2])
    blob = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)], ir_version=8).SerializeToString()
    small = pruned_graph(blob, ["a"])
    m = onnx.load_from_string(small)
    assert [n.output[0] for n in m.graph.node] == ["a"] and [i.name for i in m.graph.initializer] == ["w1"]
    assert [i.name for i in m.graph.input] == ["x", "w1"] and [o.name for o in m.graph.output] == ["a"]
    got = ort.InferenceSession(small, providers=["CPUExecutionProvider"]).run(None, {"x": np.ones((1, 2), np.float32)})
    assert np.allclose(got[0], 2.0)

"""The fine-tuned whole-field branch (training/objectnet.py): the base graph read back into torch computes
what the graph computes, the written branch computes what torch computes while the single-cell outputs
stay the base's, and fine-tuning checkpoints every epoch and resumes."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from malaria_detect.errors import UsageError
from malaria_detect.imaging import normalize, resize_uint8

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")
from malaria_detect.training import heads as H  # noqa: E402
from malaria_detect.training import objectnet as O  # noqa: E402
from malaria_detect.training.objectcrops import Crops, loss_weights  # noqa: E402


def _cells(samples, n=8):
    files = sorted((samples / "Uninfected").glob("*.webp"))[:n // 2] + sorted((samples / "Parasitized").glob("*.webp"))[:n // 2]
    return np.stack([resize_uint8(Image.open(f).convert("RGB"), 112) for f in files])


def _heads(C=1280, seed=1):
    rng = np.random.default_rng(seed)
    return {"parasitized": [(rng.normal(0, 0.05, (1, C)).astype(np.float32), np.array([0.3], np.float32))],
            "kind": [(rng.normal(0, 0.05, (4, C)).astype(np.float32), rng.normal(0, 1, 4).astype(np.float32))],
            "stage": [(rng.normal(0, 0.05, (16, C)).astype(np.float32), np.zeros(16, np.float32)),
                      (rng.normal(0, 0.5, (4, 16)).astype(np.float32), np.zeros(4, np.float32))]}


def test_the_base_graph_read_into_torch_computes_its_features(samples):
    from malaria_detect.cells.predictor import Predictor

    base = H.base_model_path("robust")
    record = Predictor.load(base).record
    x = _cells(samples)
    want, _ = H.compute_features(base, record, x, progress=False)
    net = O.torch_from_onnx(base)
    with torch.no_grad():
        got = net.forward_features(torch.from_numpy(normalize(x, record))).mean((2, 3)).numpy()
    assert np.abs(got - want).max() < 1e-3 * max(1.0, np.abs(want).max())


def test_written_branch_computes_what_torch_computes_and_keeps_single_cells(samples, tmp_path):
    from malaria_detect.cells.predictor import Predictor
    from malaria_detect.modelfile import write_model_record

    base = H.base_model_path("robust")
    pred0 = Predictor.load(base)
    x = _cells(samples)
    heads = _heads()
    trunk, branch = O.build(base, heads)
    with torch.no_grad():  # the branch starts as the base's own stages: its features are the base's
        want = [t.numpy() for t in branch.eval()(trunk(torch.from_numpy(normalize(x, pred0.record))))]
    f, _ = H.compute_features(base, pred0.record, x, progress=False)
    ref = H.apply_heads(f, heads)
    assert all(np.allclose(w, r, atol=1e-3) for w, r in zip(want, ref))
    with torch.no_grad():  # a branch of its own: its blocks must reach the graph, not only its heads
        for p in branch.blocks.parameters():
            p.mul_(1.05)
        want = [t.numpy() for t in branch(trunk(torch.from_numpy(normalize(x, pred0.record))))]
    assert not np.allclose(want[0], ref[0], atol=1e-2)
    out = tmp_path / "branch.onnx"
    O.write_branch(base, branch, out)
    record = pred0.record
    record.kind_names, record.stage_names = H.KIND_NAMES, H.STAGE_NAMES
    record.object_head = {"temperature": 0.8, "threshold": 0.3}
    write_model_record(out, record)
    pred = Predictor.load(out)
    z, cam, ood, zk, zs = pred.run_fields(x)
    assert cam is None  # a field's objects run the trunk and the branch, not the cell head
    assert np.allclose(z, want[0], atol=1e-3) and np.allclose(zk, want[1], atol=1e-3)
    assert np.allclose(zs, want[2], atol=1e-3)
    assert O.disagreement(out, trunk, branch, x) < 1e-3
    zc, camc, oodc, _, _ = pred.run_all(x)  # single cells: the base's own outputs, as they were
    z0, cam0, ood0 = pred0.run(x)[:3]
    assert np.allclose(zc, z0, atol=1e-5) and np.allclose(camc, cam0, atol=1e-5) and np.allclose(oodc, ood0)
    # the whole-field not-a-cell score is the base's without its view check: the base's own graph with the
    # view check's scale set to 0 computes it too
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(base))
    init = next(i for i in m.graph.initializer if i.name.endswith("ood_view_scale"))
    init.CopyFrom(numpy_helper.from_array(np.zeros_like(numpy_helper.to_array(init)), init.name))
    onnx.save(m, str(tmp_path / "no_view.onnx"))
    write_model_record(tmp_path / "no_view.onnx", Predictor.load(base).record)  # the base's own record
    taps_only = Predictor.load(tmp_path / "no_view.onnx").run(x)[2]
    assert np.allclose(ood, taps_only, rtol=1e-5) and (ood <= oodc + 1e-5).all()
    with pytest.raises(UsageError, match="already has whole-field heads"):
        O.write_branch(out, branch, tmp_path / "again.onnx")


def test_finetuning_checkpoints_each_epoch_and_resumes(samples, tmp_path):
    from malaria_detect.cells.predictor import Predictor

    base = H.base_model_path("robust")
    record = Predictor.load(base).record
    x = _cells(samples, 16)
    n = len(x)
    c = Crops(x=x, kind=np.array([0] * (n - 2) + [1, 2], np.int16),
              parasitized=np.array([0] * (n // 2) + [1] * (n // 2 - 2) + [-1, -1], np.int16),
              stage=np.array([-1] * (n // 2) + [0, 3] * ((n // 2 - 2) // 2) + [-1, -1], np.int16),
              source=np.array([0] * n, np.int16), split=np.zeros(n, np.int16))
    w = loss_weights(c, c.split == 0, 1.0)
    assert w["w_par"][c.parasitized < 0].sum() == 0 and np.isclose(w["w_par"].sum(), 1.0)
    heads = _heads()

    class Killed(Exception):
        pass

    def kill_after_first_epoch(msg):  # the session ends right after epoch 1's checkpoint
        if msg.startswith("fine-tune epoch 1:"):
            raise Killed

    with pytest.raises(Killed):
        O.finetune(base, heads, c, w, record, tmp_path / "ft", epochs=2, lr=1e-3, batch=8, progress=False,
                   say=kill_after_first_epoch)
    state = json.loads((tmp_path / "ft" / "state.json").read_text())
    assert state["epoch"] == 1 and (tmp_path / "ft" / "last.safetensors").is_file()
    said = []
    _, b2 = O.finetune(base, heads, c, w, record, tmp_path / "ft", epochs=2, lr=1e-3, batch=8, resume=True,
                       progress=False, say=said.append)
    assert said[0] == "fine-tuning: resumed after epoch 1" and len(said) == 2  # one more epoch, not two
    assert json.loads((tmp_path / "ft" / "state.json").read_text())["epoch"] == 2
    _, b0 = O.build(base, heads)
    moved = [n for (n, p2), (_, p0) in zip(b2.named_parameters(), b0.named_parameters()) if not torch.equal(p2, p0)]
    assert any(n.startswith("blocks.") for n in moved) and any(n.startswith("heads.") for n in moved)
    # the killed and resumed run ends where one run of both epochs ends: the weights, the optimizer's
    # state and the learning rate's place in its schedule were all restored
    _, once = O.finetune(base, heads, c, w, record, tmp_path / "once", epochs=2, lr=1e-3, batch=8, progress=False,
                         say=lambda m: None)
    assert all(torch.allclose(p2, p1, atol=1e-5) for p2, p1 in zip(b2.parameters(), once.parameters()))
    with pytest.raises(UsageError, match="more than the 1 asked for"):
        O.finetune(base, heads, c, w, record, tmp_path / "ft", epochs=1, lr=1e-3, batch=8, resume=True,
                   progress=False, say=lambda m: None)

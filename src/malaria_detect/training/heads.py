"""One classifier for every object of a field: new heads on a trained cell model's features (the run
that uses them, `malaria-detect train-heads`, is training/headsrun.py; its fine-tuned branch
training/objectnet.py).

A cell model (the robust one: EfficientNet-Lite0 fine-tuned on NIH and IML cells) already computes a
1,280-number description of every crop it sees (the global average of its last feature map). This
step keeps that backbone as it is and fits three heads on it, on the objects of three labs:

- `parasitized` (1 logit, linear, replaces the model's own head: the CAM stays exact): red cells of
  NIH (train patients), IML (training block) and TXL-PBC (train), *and* every look-alike taught as
  uninfected on purpose: white cells and their fragments, platelets, platelets pasted onto uninfected
  red cells, stain precipitate and dust drawn onto them, background.
- `kind` (red cell / white cell / platelet / other): TXL-PBC's labelled objects (its only data with
  white cells and platelets), IML and NIH red cells, the look-alikes.
- `stage` (ring / trophozoite / schizont / gametocyte): IML's infected cells of the training block.
  Few trophozoites and schizonts exist: every infected cell is seen in several jittered views, and the
  loss weights each stage by the inverse of its count (balanced), so the rare ones are not ignored.

Choices are made on validation data only (NIH validation patients, IML PA171770-799, TXL-PBC val);
IML PA1718xx and the NIH test patients are never read here. The model file `write_heads` writes is the
base graph with the new head weights and three more outputs (`object_logits`, `kind_logits`,
`stage_logits`); its record names the kinds and stages and carries the operating points.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import UsageError
from ..record import Record
from .config import HeadsConfig
from .objectcrops import KIND_NAMES, RED, SOURCES, STAGE_NAMES, Crops, loss_weights

__all__ = ["KIND_NAMES", "STAGE_NAMES", "RED", "SOURCES", "Crops", "fit_heads", "apply_heads",
           "write_heads", "compute_features", "base_head", "base_model_path"]


# ------------------------------------------------------------------ features and heads


def base_model_path(base: str) -> Path:
    from ..modelfile import BUNDLED_NAMES, bundled_model_path

    if base in BUNDLED_NAMES:
        return bundled_model_path().with_name(BUNDLED_NAMES[base])
    p = Path(base)
    if not p.is_file():
        raise UsageError(f"--base {base}: no such model file (or bundled name: {', '.join(BUNDLED_NAMES)})")
    return p


def _head_nodes(model):
    """The base graph's head: the Gemm on the pooled features, and the CAM's Einsum + Add."""
    g = model.graph
    gemm = next((n for n in g.node if n.op_type == "Gemm"), None)
    ein = next((n for n in g.node if n.op_type == "Einsum" and "not_a_cell" not in n.name), None)
    add = next((n for n in g.node if n.op_type == "Add" and ein is not None and ein.output[0] in n.input), None)
    if gemm is None or ein is None or add is None or len(gemm.input) != 3:
        raise UsageError("the base model's graph has no linear head on pooled features (Gemm) and CAM (Einsum)")
    return gemm, ein, add


def base_head(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The base model's own parasitized head (w (C,), b (1,)), read from its graph."""
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(path))
    gemm, _, _ = _head_nodes(m)
    inits = {i.name: i for i in m.graph.initializer}
    return (numpy_helper.to_array(inits[gemm.input[1]]).reshape(-1),
            numpy_helper.to_array(inits[gemm.input[2]]).reshape(-1))


def feature_session(path: Path, threads: int = 0):
    """An ONNX Runtime session of the base model that also returns its pooled features."""
    import onnx
    import onnxruntime as ort

    m = onnx.load(str(path))
    gemm, _, _ = _head_nodes(m)
    m.graph.output.append(onnx.helper.make_tensor_value_info(gemm.input[0], onnx.TensorProto.FLOAT, None))
    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
    return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"]), gemm.input[0]


def compute_features(path: Path, record: Record, x: np.ndarray, batch: int = 128, progress: bool = True):
    """(features (N, C) float32, ood scores (N,)) of uint8 crops, by the base model."""
    from tqdm import tqdm

    from ..imaging import normalize

    sess, name = feature_session(path)
    feats, ood = [], []
    for i in tqdm(range(0, len(x), batch), desc="features", unit="batch", disable=not progress):
        xb = normalize(x[i:i + batch], record)
        f, s = sess.run([name, "ood_score"], {"image": xb})
        feats.append(f.reshape(len(xb), -1).astype(np.float32))
        ood.append(s)
    return np.concatenate(feats), np.concatenate(ood)


def _mlp(C: int, n_out: int, hidden: int):
    import torch

    return torch.nn.Linear(C, n_out) if not hidden else \
        torch.nn.Sequential(torch.nn.Linear(C, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, n_out))


def fit_heads(f: np.ndarray, c: Crops, cfg: HeadsConfig, base_head=None, say=print) -> dict:
    """The three heads on the features of the training crops (torch, full batch, AdamW), returned as
    NumPy layers on the raw features: {"parasitized": [(w (1, C), b (1,))], "kind": [(W, b), ...],
    "stage": [...]} (ReLU between layers). The parasitized head stays linear (the CAM is exact); it starts
    from `base_head` (the base model's (w, b)) and is pulled towards it by `cfg.anchor`, so what the
    base learnt on NIH and IML cells is kept while the look-alikes are learnt."""
    import torch

    torch.manual_seed(cfg.seed)
    tr = c.split == 0
    ft = torch.from_numpy(f[tr])
    mu, sd = ft.mean(0), ft.std(0) + 1e-6
    z = (ft - mu) / sd
    kind = torch.from_numpy(c.kind[tr].astype(np.int64))
    par = torch.from_numpy(c.parasitized[tr].astype(np.float32))
    stage = torch.from_numpy(c.stage[tr].astype(np.int64))
    wt = loss_weights(c, tr, cfg.lookalike_weight)
    labelled = c.parasitized[tr] >= 0
    w_par = torch.from_numpy(wt["w_par"][tr])
    kind_w, st_w = torch.from_numpy(wt["kind_w"]), torch.from_numpy(wt["st_w"])
    st_m = stage >= 0
    C = f.shape[1]
    heads = {"parasitized": torch.nn.Linear(C, 1), "kind": torch.nn.Linear(C, len(KIND_NAMES)),
             "stage": _mlp(C, len(STAGE_NAMES), cfg.hidden)}
    anchor = None
    if base_head is not None:  # the base head in standardised units: w0 . f + b0 = (w0 sd) . z + (b0 + w0 . mu)
        w0 = torch.from_numpy(np.array(base_head[0], np.float32).reshape(-1))
        with torch.no_grad():
            heads["parasitized"].weight.copy_((w0 * sd)[None])
            heads["parasitized"].bias.copy_(torch.tensor([float(base_head[1][0]) + float((w0 * mu).sum())]))
        anchor = heads["parasitized"].weight.detach().clone()
    params = [p for h in heads.values() for p in h.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0 if anchor is not None else cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.steps)
    lab = torch.from_numpy(labelled)
    F = torch.nn.functional
    for step in range(cfg.steps):
        opt.zero_grad()
        zp = heads["parasitized"](z).squeeze(1)
        l_par = (F.binary_cross_entropy_with_logits(zp[lab], par[lab], reduction="none") * w_par[lab]).sum()
        if anchor is not None:
            l_par = l_par + cfg.anchor * ((heads["parasitized"].weight - anchor) ** 2).sum()
        l_kind = F.cross_entropy(heads["kind"](z), kind, weight=kind_w)
        l_st = F.cross_entropy(heads["stage"](z[st_m]), stage[st_m], weight=st_w) \
            if st_m.any() else torch.zeros(())
        decay = sum((p ** 2).sum() for n in ("kind", "stage") for p in heads[n].parameters() if p.ndim == 2)
        loss = l_par + l_kind + l_st + (cfg.weight_decay * decay if anchor is not None else 0.0)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == cfg.steps - 1:
            say(f"step {step}: parasitized {l_par.item():.4f} kind {l_kind.item():.4f} stage {l_st.item():.4f}")
    out = {}
    with torch.no_grad():
        for name, h in heads.items():
            layers = [h] if isinstance(h, torch.nn.Linear) else [m for m in h if isinstance(m, torch.nn.Linear)]
            W, bias = layers[0].weight / sd, layers[0].bias.clone()  # fold the standardisation: W (f - mu) / sd + b
            bias -= (W * mu).sum(1)
            out[name] = [(W.numpy().astype(np.float32), bias.numpy().astype(np.float32))] + \
                [(m.weight.numpy().astype(np.float32), m.bias.numpy().astype(np.float32)) for m in layers[1:]]
    return out


def _forward(f: np.ndarray, layers) -> np.ndarray:
    for i, (W, b) in enumerate(layers):
        f = f @ W.T + b
        if i < len(layers) - 1:
            f = np.maximum(f, 0)
    return f


def apply_heads(f: np.ndarray, heads: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(parasitized logits, kind logits, stage logits) of features, as the exported graph computes them."""
    return _forward(f, heads["parasitized"])[:, 0], _forward(f, heads["kind"]), _forward(f, heads["stage"])


def write_heads(base: Path, heads: dict, out: Path) -> None:
    """The base graph, its cell head (`logits`, `cam`) and not-a-cell flag as they are, with the heads
    added as outputs: the whole-field parasitized head `object_logits`, `kind_logits` and
    `stage_logits`."""
    import onnx
    from onnx import helper, numpy_helper

    m = onnx.load(str(base))
    g = m.graph
    if any(o.name in ("object_logits", "kind_logits", "stage_logits") for o in g.output):
        raise UsageError(f"{base} already has whole-field heads: give the model it was made from as --base")
    gemm, _, _ = _head_nodes(m)
    feat = gemm.input[0]
    g.initializer.append(numpy_helper.from_array(np.array([-1], np.int64), "object_head.shape"))
    for head, layers in (("object", heads["parasitized"]), ("kind", heads["kind"]), ("stage", heads["stage"])):
        x = feat
        for i, (W, bias) in enumerate(layers):
            name = f"{head}_head.{i}"
            g.initializer.extend([numpy_helper.from_array(W.T.astype(np.float32), f"{name}.weight"),
                                  numpy_helper.from_array(bias.astype(np.float32), f"{name}.bias")])
            last = i == len(layers) - 1
            y = f"{head}_logits" if last and head != "object" else f"/{name}/Gemm_output_0"
            g.node.append(helper.make_node("Gemm", [x, f"{name}.weight", f"{name}.bias"], [y], name=f"/{name}/Gemm"))
            if not last:
                g.node.append(helper.make_node("Relu", [y], [f"/{name}/Relu_output_0"], name=f"/{name}/Relu"))
                y = f"/{name}/Relu_output_0"
            x = y
        if head == "object":  # one logit a crop, as the cell head's `logits`
            g.node.append(helper.make_node("Reshape", [x, "object_head.shape"], ["object_logits"],
                                           name="/object_head/Reshape"))
        g.output.append(helper.make_tensor_value_info(f"{head}_logits", onnx.TensorProto.FLOAT,
                                                      ["batch"] if head == "object" else ["batch", len(layers[-1][1])]))
    del m.metadata_props[:]
    onnx.checker.check_model(m)
    tmp = out.with_name(out.name + ".tmp")
    onnx.save(m, str(tmp))
    tmp.replace(out)

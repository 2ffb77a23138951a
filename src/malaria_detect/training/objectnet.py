"""The whole-field heads on a fine-tuned copy of the base's last stages (`train-heads --finetune-epochs N`).

Heads on frozen features (training/heads.py) cannot learn what the base's features do not already
separate: on validation fields of a second IML block (PA171800-829) an infected cell scored lower than
the most parasite-like look-alikes of TXL-PBC (platelets lying on red cells, stain dots). So the
whole-field path gets its own copy of the base's last stages, fine-tuned end to end on the object crops
with the three heads, on augmented views (flips, rotations, other labs' stains and lamps):

    image -> stem + blocks 0-7 (the base's, frozen) -+-> blocks 8-15 + conv head (the base's)   -> cell head, CAM,
                                                      |   the not-a-cell flag
                                                      +-> blocks 8-15 + conv head (fine-tuned) -> object, kind, stage

The single-cell path (`logits`, `cam`, `ood_score`) stays the base's, bit for bit: the gate measured on
the NIH test patients is the base's own (the not-a-cell flag's taps end at block 7, its view check reads
the original stages' pooled features, which stay). The branch starts from the base's weights (its batch
norms, folded into the ONNX convolutions, become a per-channel bias; their statistics stay frozen) and
from the heads fitted on the frozen features; the loss weights are theirs (objectcrops.loss_weights),
without the pull towards the base's head (`--anchor`: the branch's features are no longer the base's);
AdamW weight decay 1e-4. Each epoch is checkpointed (safetensors) and `--resume` continues.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from ..modelfile import OBJECT_OOD

BRANCH_FROM = 8   # the first block of the fine-tuned copy: after the not-a-cell flag's last tap (block 7)
BRANCH_INPUT = "/_blocks.7/Add_output_0"
PREFIX = "objnet/"
OUTPUTS = ("object_logits", "kind_logits", "stage_logits")


def _bn_of(conv: str) -> str:
    """The torch batch norm that follows each convolution of models.EfficientNetLite."""
    if conv in ("_conv_stem", "_conv_head"):
        return {"_conv_stem": "_bn0", "_conv_head": "_bn1"}[conv]
    block, name = conv.rsplit(".", 1)
    return f"{block}." + {"_expand_conv": "_bn0", "_depthwise_conv": "_bn1", "_project_conv": "_bn2"}[name]


def torch_from_onnx(path: Path):
    """models.EfficientNetLite with the weights of a base ONNX graph whose batch norms were folded into its
    convolutions: each batch norm becomes the identity plus the folded bias (mean 0, variance 1 - eps),
    so the network computes what the graph computes (checked by the caller against the graph)."""
    import onnx
    import torch
    from onnx import numpy_helper

    from .models import create_model

    m = onnx.load(str(path))
    inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    net = create_model("efficientnet_lite0", pretrained=False)
    mods = dict(net.named_modules())
    done = 0
    for n in m.graph.node:
        if n.op_type != "Conv":
            continue
        conv = n.name.strip("/").rsplit("/", 1)[0].replace("/", ".")
        w, b = inits[n.input[1]], inits[n.input[2]]
        c, bn = mods[conv], mods[_bn_of(conv)]
        if tuple(c.weight.shape) != w.shape:
            raise ValueError(f"{path}: {conv} has weights {w.shape}, the network {tuple(c.weight.shape)}")
        with torch.no_grad():
            c.weight.copy_(torch.from_numpy(np.array(w)))
            bn.weight.fill_(1.0)
            bn.bias.copy_(torch.from_numpy(np.array(b)))
            bn.running_mean.zero_()
            bn.running_var.fill_(1.0 - bn.eps)
        done += 1
    if done != 49:
        raise ValueError(f"{path}: {done} convolutions, not the 49 of EfficientNet-Lite0")
    return net.eval()


def _torch():
    import torch
    import torch.nn as nn

    class Branch(nn.Module):
        """Blocks 8-15, the conv head and the three heads: (N, 80, h, w) -> (object, kind, stage) logits."""

        def __init__(self, net, heads: dict):
            super().__init__()
            self.blocks = nn.ModuleList(net._blocks[BRANCH_FROM:])
            self.conv_head, self.bn, self.act = net._conv_head, net._bn1, nn.ReLU6()
            self.heads = nn.ModuleDict({k: _sequential(v) for k, v in heads.items()})

        def forward(self, x):
            for b in self.blocks:
                x = b(x)
            f = self.act(self.bn(self.conv_head(x))).mean((2, 3))
            return self.heads["parasitized"](f)[:, 0], self.heads["kind"](f), self.heads["stage"](f)

    def _sequential(layers):
        mods = []
        for i, (W, b) in enumerate(layers):
            lin = nn.Linear(W.shape[1], W.shape[0])
            with torch.no_grad():
                lin.weight.copy_(torch.from_numpy(np.array(W, np.float32)))
                lin.bias.copy_(torch.from_numpy(np.array(b, np.float32)))
            mods += [lin] + ([nn.ReLU()] if i < len(layers) - 1 else [])
        return nn.Sequential(*mods)

    class Trunk(nn.Module):
        def __init__(self, net):
            super().__init__()
            self.stem, self.bn, self.act = net._conv_stem, net._bn0, nn.ReLU6()
            self.blocks = nn.ModuleList(net._blocks[:BRANCH_FROM])

        def forward(self, x):
            x = self.act(self.bn(self.stem(x)))
            for b in self.blocks:
                x = b(x)
            return x

    return Trunk, Branch


def build(base: Path, heads: dict):
    """(frozen trunk, trainable branch) of the base graph, the branch's heads from `heads` (NumPy layers)."""
    import copy

    Trunk, Branch = _torch()
    net = torch_from_onnx(base)
    trunk = Trunk(net).eval()
    for p in trunk.parameters():
        p.requires_grad_(False)
    return trunk, Branch(copy.deepcopy(net), heads)


def _frozen_bn(module) -> None:
    """Batch norms keep their (folded) statistics: eval mode, their scale and shift still learn."""
    import torch.nn as nn

    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()


def finetune(base: Path, heads: dict, c, weights: dict, record, out: Path, epochs: int, lr: float,
             batch: int = 64, resume: bool = False, seed: int = 0, progress: bool = True, say=print,
             lab_share: float = 0.3):
    """Fine-tune the branch on the training crops (split 0) for `epochs`; checkpoint every epoch in
    out/ (last.safetensors + state.json). Returns (the frozen trunk, the branch), in eval mode."""
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    from .augment import to_input
    from .checkpoint import load_resume, save_resume

    torch.manual_seed(seed)
    trunk, branch = build(base, heads)
    out.mkdir(parents=True, exist_ok=True)
    tr = np.flatnonzero(c.split == 0)
    backbone = [p for n, p in branch.named_parameters() if not n.startswith("heads.")]
    opt = torch.optim.AdamW([{"params": backbone, "lr": lr}, {"params": branch.heads.parameters(), "lr": lr * 10}],
                            weight_decay=1e-4)
    steps_per_epoch = len(tr) // batch
    def cosine(s):
        return 0.5 * (1 + np.cos(np.pi * min(1.0, s / max(1, epochs * steps_per_epoch))))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine)
    state = {"epoch": 0}
    if resume and (out / "state.json").is_file():
        state = load_resume(out, branch, opt)
        if state["epoch"] > epochs:
            from ..errors import UsageError

            raise UsageError(f"{out} holds {state['epoch']} fine-tuning epochs, more than the {epochs} asked for: "
                             "give another --out")
        sched.last_epoch = state["epoch"] * steps_per_epoch  # the learning rate where the run stopped
        for group, base_lr in zip(opt.param_groups, sched.base_lrs):
            group["lr"] = base_lr * cosine(sched.last_epoch)
        say(f"fine-tuning: resumed after epoch {state['epoch']}")
    w_par, kind_w, st_w = (torch.from_numpy(weights[k]) for k in ("w_par", "kind_w", "st_w"))
    par = torch.from_numpy(c.parasitized.astype(np.float32))
    kind = torch.from_numpy(c.kind.astype(np.int64))
    stage = torch.from_numpy(c.stage.astype(np.int64))
    for epoch in range(state["epoch"], epochs):
        rng = np.random.default_rng(seed + epoch)
        g = torch.Generator().manual_seed(seed + epoch)
        order = rng.permutation(tr)
        branch.train()
        _frozen_bn(branch)
        t0, tot = time.time(), 0.0
        bar = tqdm(range(steps_per_epoch), desc=f"fine-tune epoch {epoch + 1}/{epochs}", unit="batch",
                   disable=not progress)
        for s in bar:
            idx = order[s * batch:(s + 1) * batch]
            x = to_input(c.x[idx], record.mean, record.std, g, robust=True, lab_share=lab_share)
            with torch.no_grad():
                h = trunk(x)
            zp, zk, zs = branch(h)
            i = torch.from_numpy(idx)
            lab = par[i] >= 0
            l_par = (F.binary_cross_entropy_with_logits(zp[lab], par[i][lab], reduction="none")
                     * w_par[i][lab]).sum() / w_par[i][lab].sum().clamp_min(1e-12) if lab.any() else zp.sum() * 0
            l_kind = F.cross_entropy(zk, kind[i], weight=kind_w)
            sm = stage[i] >= 0
            l_st = F.cross_entropy(zs[sm], stage[i][sm], weight=st_w) if sm.any() else zs.sum() * 0
            loss = l_par + l_kind + l_st
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            tot += float(loss.detach())
            if s % 20 == 0:
                bar.set_postfix(loss=f"{tot / (s + 1):.4f}")
        state = {"epoch": epoch + 1, "loss": tot / max(1, steps_per_epoch), "seconds": round(time.time() - t0, 1)}
        save_resume(out, branch, opt, state)
        say(f"fine-tune epoch {epoch + 1}: loss {state['loss']:.4f} ({state['seconds']:.0f} s)")
    return trunk, branch.eval()


def write_branch(base: Path, branch, out: Path, input_size: int = 112) -> None:
    """The base graph as it is, with the fine-tuned branch from BRANCH_INPUT added (its names prefixed
    PREFIX) and its three outputs."""
    import io

    import onnx
    import torch
    from onnx import compose

    from ..errors import UsageError

    m = onnx.load(str(base))
    if any(o.name in OUTPUTS for o in m.graph.output):
        raise UsageError(f"{base} already has whole-field heads: give the model it was made from as --base")
    if not any(BRANCH_INPUT in n.output for n in m.graph.node):
        raise UsageError(f"{base} has no {BRANCH_INPUT}: not an EfficientNet-Lite0 graph of this project")
    side = max(1, input_size // 16)  # block 7's map (stride 16); the axes are dynamic anyway
    dummy = torch.zeros(2, branch.blocks[0]._expand_conv.in_channels, side, side)
    buf = io.BytesIO()
    torch.onnx.export(branch.eval(), (dummy,), buf, input_names=["features"],
                      output_names=list(OUTPUTS), opset_version=17, dynamo=False,
                      dynamic_axes={"features": {0: "batch", 2: "h", 3: "w"}, **{o: {0: "batch"} for o in OUTPUTS}})
    b = compose.add_prefix(onnx.load_from_string(buf.getvalue()), PREFIX)
    g = m.graph
    rename = {PREFIX + "features": BRANCH_INPUT, **{PREFIX + o: o for o in OUTPUTS}}
    for n in b.graph.node:
        n.input[:] = [rename.get(i, i) for i in n.input]
        n.output[:] = [rename.get(o, o) for o in n.output]
    g.node.extend(b.graph.node)
    g.initializer.extend(b.graph.initializer)
    for o in b.graph.output:
        o.name = rename.get(o.name, o.name)
        g.output.append(o)
    add_object_ood(m)
    del m.metadata_props[:]
    onnx.checker.check_model(m)
    tmp = out.with_name(out.name + ".tmp")
    onnx.save(m, str(tmp))
    tmp.replace(out)


def add_object_ood(m) -> None:
    """Add the output `object_ood_score` to the graph `m` (an onnx ModelProto): the not-a-cell score of
    the tapped layers alone (both inside the trunk), without the view check, whose pooled features are
    the base's last stages. The whole-field path reads it instead of `ood_score`, so that a field's
    objects run the trunk and the branch only, not the base's last stages as well; what the view check
    caught there (views of several cells or of background) the kind head says ("other", taught on
    background crops), and the detector boxes one object at a time."""
    from onnx import helper

    if any(o.name == OBJECT_OOD for o in m.graph.output):
        return
    made = {o: n for n in m.graph.node for o in n.output}
    top = made.get("ood_score")
    stack = made.get(top.input[0]) if top is not None and top.op_type == "ReduceMax" else None
    if stack is None or stack.op_type != "Concat":
        raise ValueError("the graph's ood_score is not the max of its parts (training/notacell.py)")

    def reads_view(t: str, depth: int = 0) -> bool:
        n = made.get(t)
        return n is not None and depth < 6 and any("ood_view" in i or reads_view(i, depth + 1) for i in n.input)

    parts = [i for i in stack.input if not reads_view(i)]
    if not parts:
        raise ValueError("the graph's not-a-cell score has no tapped layers")
    cat, out = helper.make_node("Concat", parts, [PREFIX + "ood_parts"], name=PREFIX + "ood/Concat",
                                axis=next(a.i for a in stack.attribute if a.name == "axis")), top
    red = helper.make_node("ReduceMax", [*cat.output, *out.input[1:]], [OBJECT_OOD], name=PREFIX + "ood/ReduceMax")
    red.attribute.extend(out.attribute)
    m.graph.node.extend([cat, red])
    shape = next(o for o in m.graph.output if o.name == "ood_score")
    m.graph.output.append(helper.make_tensor_value_info(OBJECT_OOD, shape.type.tensor_type.elem_type, ["batch"]))


def disagreement(path: Path, trunk, branch, x: np.ndarray) -> float:
    """Max |difference| between the written graph's whole-field outputs and torch's, on uint8 crops."""
    import torch

    from ..cells.predictor import Predictor
    from ..imaging import normalize

    pred = Predictor.load(path)
    got = pred.run_fields(x)
    with torch.no_grad():
        want = branch.eval()(trunk(torch.from_numpy(normalize(x, pred.record))))
    return max(float(np.abs(g - w.numpy()).max()) for g, w in zip((got[0], got[3], got[4]), want))


def describe(out: Path) -> dict:
    """What the fine-tuning run left (for the record)."""
    s = out / "state.json"
    return json.loads(s.read_text()) if s.is_file() else {}

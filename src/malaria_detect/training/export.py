"""torch checkpoint -> ONNX with the whole Record as metadata, a CAM and a not-a-cell score as extra
outputs, re-validated with ONNX Runtime; optional int8 (static QDQ) quantization with an accuracy bound.

Graph outputs (batch axis dynamic): logit (N,), cam (N, h, w), ood_score (N,); what they are, and
the module that computes them, is `models.ExportWrapper`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .. import data as D
from ..data import load_arrays
from ..errors import MalariaDetectError
from ..evaluation import metrics as M
from ..imaging import normalize
from ..modelfile import write_model_record
from ..record import Record
from .checkpoint import load_checkpoint
from .models import ExportWrapper, torch_outputs

OUTPUTS = ["logit", "cam", "ood_score"]
PROB_TOLERANCE = 1e-4   # max |p_onnx - p_torch| allowed on the sample images (fp32)
INT8_MAX_DROP = 0.005   # refuse an int8 model that loses more than 0.5 accuracy points on validation


class ExportError(MalariaDetectError, RuntimeError):
    """An exported model that is refused (it disagrees with PyTorch, or int8 costs too much accuracy)."""


def export_onnx(model: nn.Module, record: Record, ood: dict, out: str | Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    wrapper = ExportWrapper(model.eval().to(memory_format=torch.contiguous_format), ood).eval()
    x = torch.zeros(2, 3, record.input_size, record.input_size)
    torch.onnx.export(wrapper, (x,), str(out), input_names=["image"], output_names=OUTPUTS,
                      dynamic_axes={"image": {0: "batch"}, **{o: {0: "batch"} for o in OUTPUTS}},
                      opset_version=17, dynamo=False)
    write_metadata(out, record)
    return out


def write_metadata(path: Path, record: Record) -> None:
    """Store the (validated) record and a hash of the weights, which Predictor.load checks."""
    write_model_record(path, record)


def sample_arrays(record: Record, folder: str | Path) -> tuple[np.ndarray, np.ndarray]:
    items = D.find_images(folder)
    x, y, _, _ = load_arrays(items, record.input_size, use_cache=False)
    return x, y


def validate_onnx(onnx_path: Path, model, ood, record: Record, x_uint8: np.ndarray, tol: float) -> float:
    """Max |p_onnx - p_torch| over the images; raises if above `tol`."""
    from ..cells.predictor import Predictor

    pred = Predictor.load(onnx_path)
    z_onnx, _, s_onnx = pred.run(x_uint8)
    z_torch, _, s_torch = torch_outputs(model, ood, record, x_uint8)
    diff = float(np.abs(record.probability(z_onnx) - record.probability(z_torch)).max())
    if diff > tol:
        raise ExportError(f"ONNX and PyTorch disagree: max |dp| = {diff:.2e} > tolerance {tol:.0e}")
    return diff


def quantize_int8(fp32_path: Path, out: Path, calib_uint8: np.ndarray, record: Record) -> Path:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"image": normalize(calib_uint8[i:i + 32], record)}
                                 for i in range(0, len(calib_uint8), 32)])

        def get_next(self):
            return next(self.batches, None)

    pre = out.with_suffix(".pre.onnx")
    quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=True)
    try:
        # keep the small numerical tail (CAM, not-a-cell distance) in fp32: quantize the convolutions
        quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        op_types_to_quantize=["Conv"])
    finally:
        pre.unlink(missing_ok=True)
    write_metadata(out, record)
    return out


def export(checkpoint: str | Path, out: str | Path, int8: bool = False, target_sensitivity: float | None = None,
           sample_dir: str | Path | None = None, data_dir: str | Path | None = None, tol: float = PROB_TOLERANCE,
           max_int8_drop: float = INT8_MAX_DROP) -> dict:
    """Export a checkpoint; returns a report dict. Validation images come from the training data's
    validation patients when `data_dir` is given, else from `sample_dir` (the committed sample)."""
    model, record, ood = load_checkpoint(checkpoint)
    report = {"checkpoint": str(checkpoint)}
    val_x = val_y = None
    if data_dir:
        items = D.find_images(data_dir)
        val_items = D.select(items, record.extra["split"]["val"])
        if val_items:
            val_x, val_y, _, _ = load_arrays(val_items, record.input_size)
    if target_sensitivity is not None:
        if val_x is None:
            raise D.DataError("--target-sensitivity needs --data (the validation patients' images)")
        z, _, _ = torch_outputs(model, ood, record, val_x)
        p = record.probability(z)
        record.threshold = M.threshold_for_sensitivity(val_y, p, target_sensitivity)
        record.extra["threshold_rule"] = f"sensitivity >= {target_sensitivity} on validation"
        record.extra["val_metrics"] = M.binary_metrics(val_y, p, record.threshold)
    out = Path(out)
    fp32 = export_onnx(model, record, ood, out if not int8 else out.with_suffix(".fp32.onnx"))
    check_x = sample_arrays(record, sample_dir)[0] if sample_dir else val_x
    if check_x is None:
        raise D.DataError("need --sample or --data to re-validate the exported model")
    report["max_abs_dp_fp32"] = validate_onnx(fp32, model, ood, record, check_x, tol)
    report["tolerance"] = tol
    print(f"ONNX fp32 re-validated on {len(check_x)} images: max |p_onnx - p_torch| = "
          f"{report['max_abs_dp_fp32']:.2e} (tolerance {tol:.0e})", file=sys.stderr)
    if int8:
        if val_x is None:
            raise D.DataError("--int8 needs --data: its accuracy change is measured on the validation patients")
        from ..cells.predictor import Predictor

        rng = np.random.default_rng(0)
        calib = val_x[rng.choice(len(val_x), min(256, len(val_x)), replace=False)]
        quantize_int8(fp32, out, calib, record)
        acc = {}
        for name, path in (("fp32", fp32), ("int8", out)):
            z, _, _ = Predictor.load(path).run(val_x)
            acc[name] = M.binary_metrics(val_y, record.probability(z), record.threshold)["accuracy"]
        report.update(val_accuracy_fp32=acc["fp32"], val_accuracy_int8=acc["int8"],
                      int8_accuracy_drop=acc["fp32"] - acc["int8"], int8_max_drop=max_int8_drop)
        fp32.unlink()
        print(f"int8 validation accuracy {acc['int8']:.4f} vs fp32 {acc['fp32']:.4f}", file=sys.stderr)
        if acc["fp32"] - acc["int8"] > max_int8_drop:
            out.unlink()
            raise ExportError(f"int8 model refused: validation accuracy drops by "
                               f"{100 * (acc['fp32'] - acc['int8']):.2f} points (bound {100 * max_int8_drop:.1f})")
    if data_dir and record.extra.get("split", {}).get("test"):
        # Measure the exported model itself on its held-out test patients and keep the figures in
        # its record (shown by `serve` at /model); they are never used to choose anything.
        from ..evaluation.evaluate import test_metrics

        record.extra["test_metrics"] = test_metrics(out, data_dir)
        write_metadata(out, record)
        report["test_metrics"] = record.extra["test_metrics"]
    report["out"] = str(out)
    report["bytes"] = out.stat().st_size
    return report


"""Torch-free prediction: ONNX Runtime + NumPy + Pillow.

    pred = Predictor.load()                 # the bundled model; or Predictor.load("model.onnx")
    one = pred.predict("cell.png")          # -> Prediction (also bytes, a PIL image, an HxWx3 array)
    many = pred.predict(["cell.png", "cells/"], heatmaps=True)   # -> list[Prediction], folders expanded

The preprocessing (input size, mean/std, class names, threshold, temperature, not-a-cell
threshold) is read from the model file's metadata, never declared here.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, overload

import numpy as np
from PIL import Image

from ..errors import MissingFileError, ModelError, UsageError
from ..imaging import CELL_MAX_ASPECT, ImageError, iter_image_paths, normalize, open_rgb, resize_uint8
from ..modelfile import FIELD_OUTPUTS, NAMES_HELP, _check_bundled, _check_weights, model_path, whole_field_graph
from ..record import Record, RecordError

# What `Predictor.predict` takes as one image.
ImageLike = str | os.PathLike | bytes | bytearray | memoryview | Image.Image | np.ndarray | IO[bytes]

NON_FINITE = "the model's output is not a finite number (NaN or infinity): the model file may be damaged"


@dataclass
class Prediction:
    """One image's answer: its label and calibrated p_parasitized, whether it looks like no cell at
    all (`ood`, with its score), or why it could not be read (`error`, and no label)."""

    source: str                     # the path, or a short name for an image given in memory
    label: str | None = None
    p_parasitized: float | None = None
    ood: bool | None = None
    ood_score: float | None = None
    error: str | None = None
    cam: np.ndarray | None = field(default=None, repr=False)  # (h, w) class-activation map, raw
    kind: str | None = None         # what the object looks like (a model with object heads): "red cell", ...
    stage: str | None = None        # the life stage of a parasitized cell (a model with a stage head)
    p_stage: float | None = None

    def to_dict(self, objects: bool | None = None) -> dict:
        """Typed values, as JSON writes them: None where there is no value. `kind`, `stage` and `p_stage`
        come with a model that has object heads (`objects`: True/False to say so, else when `kind` is set)."""
        d = {"path": self.source, "label": self.label, "p_parasitized": self.p_parasitized, "ood": self.ood}
        if self.kind is not None if objects is None else objects:
            d |= {"kind": self.kind, "stage": self.stage, "p_stage": self.p_stage}
        return d | {"error": self.error}

    def row(self, objects: bool | None = None) -> dict:
        """The same keys as strings, as CSV writes them ("" where there is no value)."""
        d = {"path": self.source, "label": self.label or "",
             "p_parasitized": "" if self.p_parasitized is None else f"{self.p_parasitized:.6f}",
             "ood": "" if self.ood is None else str(self.ood).lower()}
        if self.kind is not None if objects is None else objects:
            d |= {"kind": self.kind or "", "stage": self.stage or "",
                  "p_stage": "" if self.p_stage is None else f"{self.p_stage:.4f}"}
        return d | {"error": self.error or ""}



# the columns of a cell-image results table (`malaria-detect predict --csv`, the page's CSV), and those of
# a model with object heads (Predictor.csv_fields)
CSV_FIELDS = list(Prediction("").row())
OBJECT_CSV_FIELDS = list(Prediction("").row(objects=True))

_IN_MEMORY = {bytes: "bytes", bytearray: "bytes", memoryview: "bytes", Image.Image: "PIL image", np.ndarray: "array"}


def is_image_like(x) -> bool:
    """One image: a path (str or Path), encoded bytes, a file object, a PIL image or an H x W x 3
    uint8 array. (A path may name a folder, which stands for the images in it.)"""
    if isinstance(x, np.ndarray):
        return x.ndim in (2, 3)  # (N, H, W, 3) is a batch: an iterable of images
    return isinstance(x, (str, os.PathLike, *_IN_MEMORY)) or hasattr(x, "read")


def _source_name(src, i: int) -> str:
    """A short readable name for the i-th input: its path, a file's or PIL image's own file name,
    else its kind and position ("<bytes 0>", "<PIL image 2>", "<array 5>")."""
    if isinstance(src, (str, os.PathLike)):
        return str(src)
    own = getattr(src, "filename", None) or getattr(src, "name", None)
    if isinstance(own, str) and own:
        return own
    kind = next((k for t, k in _IN_MEMORY.items() if isinstance(src, t)), "file" if hasattr(src, "read") else
                type(src).__name__)
    return f"<{kind} {i}>"


def _expand(images) -> tuple[list, bool]:
    """-> (the inputs as a list, folders replaced by their image files; whether one image was given).
    An iterator is consumed here, once."""
    one = is_image_like(images)
    items = [images] if one else list(images)
    out = []
    for src in items:
        if isinstance(src, (str, os.PathLike)) and Path(src).is_dir():
            out.extend(iter_image_paths([src]))
            one = False  # a folder stands for its images: a list
        else:
            out.append(src)
    return out, one


class Predictor:
    """A model, ready to answer: `Predictor.load()` (the bundled model) or `Predictor.load("m.onnx")`,
    then `predict(image)` -> Prediction, `predict([images or folders])` -> list[Prediction]. (Whole
    microscope fields: `malaria_detect.smear`.)"""

    def __init__(self, session, record: Record, path: Path, options=None, fields_graph: bytes | None = None):
        self.session, self.record, self.path = session, record, path
        self._options, self._fields_graph, self._fields_session = options, fields_graph, None
        self._fields_lock = threading.Lock()  # the server's field workers share one Predictor

    @classmethod
    def load(cls, path: str | Path | None = None, threads: int | None = None,
             session_options: dict | None = None) -> Predictor:
        """`session_options`: onnxruntime.SessionOptions attributes to set, e.g. {"enable_cpu_mem_arena": False}."""
        import onnxruntime as ort

        path = model_path(path)
        if not path.is_file():
            raise MissingFileError(f"{path}: model file not found (give an .onnx file, {NAMES_HELP})")
        blob = path.read_bytes()
        _check_bundled(path, blob)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or os.cpu_count() or 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        for k, v in (session_options or {}).items():
            setattr(opts, k, v)
        try:
            # from the path, not from `blob`: a session made from bytes keeps a second copy of the model
            session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as e:
            raise ModelError(f"{path}: not a valid ONNX model ({str(e).splitlines()[0] if str(e) else e!r})") from None
        meta = session.get_modelmeta().custom_metadata_map
        if "malaria_detect_record" not in meta:
            raise ModelError(f"{path}: not a malaria-detect model (no preprocessing record in its metadata)")
        _check_weights(path, blob, meta)
        try:
            record = Record.from_json(meta["malaria_detect_record"])
        except (RecordError, TypeError) as e:
            raise RecordError(f"{path}: invalid model record: {e}") from None
        for name, names in (("kind_logits", record.kind_names), ("stage_logits", record.stage_names)):
            out = next((o for o in session.get_outputs() if o.name == name), None)
            width = out.shape[-1] if out is not None and out.shape else None
            if names and (out is None or (isinstance(width, int) and width != len(names))):
                raise ModelError(f"{path}: its record names {len(names)} {name.split('_')[0]}s but the graph's "
                                 f"{name} output {'is missing' if out is None else f'has {width}'}")
        if (record.object_head is not None) != any(o.name == "object_logits" for o in session.get_outputs()):
            raise ModelError(f"{path}: its record and graph disagree on a whole-field head (the record's "
                             "object_head and the graph's object_logits output come together)")
        # a field's objects: the graph pruned to the whole-field outputs, made now (the file may be gone later)
        fields = whole_field_graph(blob, path, [o.name for o in session.get_outputs()])
        return cls(session, record, path, opts, fields)

    @property
    def csv_fields(self) -> list[str]:
        """The columns of this model's results table: with kind and stage when it has object heads."""
        return OBJECT_CSV_FIELDS if self.record.kind_names else CSV_FIELDS

    # ------------------------------------------------------------ arrays

    def run(self, x_uint8: np.ndarray, batch_size: int = 64):
        """(N,S,S,3) uint8 at the model's input size -> (logits, cams, ood_scores)."""
        return self.run_all(x_uint8, batch_size)[:3]

    @property
    def outputs(self) -> list[str]:
        """The graph's outputs: logit, cam, ood_score, and kind_logits, stage_logits when it has object heads."""
        names = [o.name for o in self.session.get_outputs()]
        extra = [n for n in ("kind_logits", "stage_logits") if n in names]
        return names[:3] + extra

    def run_all(self, x_uint8: np.ndarray, batch_size: int = 64, names: list[str] | None = None):
        """(N,S,S,3) uint8 -> (logits, cams, ood_scores, kind_logits, stage_logits); the last two are None
        for a model without object heads (record.kind_names empty). `names`: the graph outputs to read
        in that order instead of `outputs` (`run_fields`: the whole-field head's logits first)."""
        names = names or self.outputs
        empty = self._batched(self.session, names, x_uint8, batch_size)
        if empty is None:
            empty = [np.zeros(0, np.float32), np.zeros((0, *self.cam_shape()), np.float32), np.zeros(0, np.float32)]
            empty += [np.zeros((0, len(self.record.kind_names)), np.float32),
                      np.zeros((0, len(self.record.stage_names)), np.float32)][:len(names) - 3]
        kinds = empty[3] if "kind_logits" in names and self.record.kind_names else None
        stages = empty[4] if "stage_logits" in names and self.record.stage_names else None
        return empty[0], empty[1], empty[2], kinds, stages

    def run_fields(self, x_uint8: np.ndarray, batch_size: int = 64, view_check: bool = False):
        """Objects cut from whole fields -> (logits, cams, ood_scores, kind_logits, stage_logits), the logits
        of the whole-field head (`object_logits`) when the model has one beside its cell head, to be
        decided with `record.field_temperature`; else `run_all`'s. The not-a-cell score is `object_ood_score`
        (cams None) when the graph has it, unless `view_check` asks for the full score (the segmenter's masked
        crops, whose kinds are not trusted: fields/analysis.py)."""
        if self.record.object_head is None:
            return self.run_all(x_uint8, batch_size)
        if self._fields_graph is None or view_check:  # the full graph: the not-a-cell score with its view check
            return self.run_all(x_uint8, batch_size, ["object_logits", *self.outputs[1:]])
        # the trunk and the branch only, in a session of the graph pruned to their outputs: no CAM
        with self._fields_lock:
            if self._fields_session is None:
                import onnxruntime as ort

                try:
                    self._fields_session = ort.InferenceSession(self._fields_graph, self._options,
                                                                providers=["CPUExecutionProvider"])
                except Exception as e:
                    raise ModelError(f"{self.path}: its whole-field graph does not load ({e})") from None
                self._fields_graph = b""  # the session holds its own copy
        widths = (None, None, len(self.record.kind_names), len(self.record.stage_names))
        z, s, k, st = self._batched(self._fields_session, FIELD_OUTPUTS, x_uint8, batch_size) or \
            [np.zeros((0,) if w is None else (0, w), np.float32) for w in widths]
        return z, None, s, k, st

    def _batched(self, session, names: list[str], x_uint8: np.ndarray, batch_size: int) -> list[np.ndarray] | None:
        """Each output of `names`, run in batches and concatenated; None for no input."""
        outs = [session.run(names, {"image": normalize(x_uint8[i:i + batch_size], self.record)})
                for i in range(0, len(x_uint8), batch_size)]
        return [np.concatenate([o[j] for o in outs]) for j in range(len(names))] if outs else None

    def cam_shape(self) -> tuple[int, int]:
        """(h, w) of one image's CAM: from the graph's declared output shape, else by running one image."""
        shape = self.session.get_outputs()[1].shape[1:]
        if len(shape) == 2 and all(isinstance(d, int) for d in shape):
            return tuple(shape)
        s = self.record.input_size
        return self.run(np.zeros((1, s, s, 3), np.uint8))[1].shape[1:]

    def run_tta(self, x_uint8: np.ndarray, batch_size: int = 64):
        """Average logits and scores over the 8 flips/rotations of the square input (CAM: identity view)."""
        return self.run_all_tta(x_uint8, batch_size)[:3]

    def run_all_tta(self, x_uint8: np.ndarray, batch_size: int = 64):
        """`run_all` averaged over the 8 flips/rotations of the square input (CAM: the identity view's)."""
        views = []
        for k in range(4):
            for flip in (False, True):
                v = np.rot90(x_uint8, k, axes=(1, 2))
                v = v[:, :, ::-1] if flip else v
                views.append(self.run_all(np.ascontiguousarray(v), batch_size))
        mean = [None if views[0][j] is None else np.mean([v[j] for v in views], 0) for j in range(5)]
        return mean[0], views[0][1], mean[2], mean[3], mean[4]

    def probability(self, logits: np.ndarray) -> np.ndarray:
        return self.record.probability(logits)

    def decide(self, logits, ood_scores):
        return self.record.decide(logits, ood_scores)

    # ------------------------------------------------------------ images

    def _decode(self, src):
        if not is_image_like(src):
            return None, f"not an image: {type(src).__name__}"
        try:
            img = open_rgb(src, max_aspect=CELL_MAX_ASPECT)
            return resize_uint8(img, self.record.input_size), None
        except ImageError as e:
            return None, str(e)
        except Exception as e:  # never let one file stop a batch
            return None, f"{type(e).__name__}: {e}"

    @overload
    def predict(self, images: ImageLike, names: Sequence[str] | None = None, batch_size: int = 64,
                tta: bool = False, heatmaps: bool = False, workers: int = 2, progress=None) -> Prediction: ...

    @overload
    def predict(self, images: Iterable[ImageLike], names: Sequence[str] | None = None, batch_size: int = 64,
                tta: bool = False, heatmaps: bool = False, workers: int = 2,
                progress=None) -> list[Prediction]: ...

    def predict(self, images, names=None, batch_size=64, tta=False, heatmaps=False, workers=2, progress=None):
        """One image -> its Prediction; several (any iterable, consumed once) -> a list, in order.

        An image is a path (str or Path), encoded bytes, a file object, a PIL image or an H x W x 3
        uint8 RGB array; a path to a folder stands for every image in it (recursively, as the command
        line lists them), so it gives a list. `names` (one per image, after folders are expanded)
        replace the sources' own names. Decoding runs on `workers` threads, overlapping inference.
        An input that cannot be read gets a Prediction with `error` set, never an exception."""
        sources, one = _expand(images)
        if names is None:
            names = [_source_name(s, i) for i, s in enumerate(sources)]
        else:
            names = [str(n) for n in names]
            if len(names) != len(sources):
                raise UsageError(f"{len(names)} names for {len(sources)} images")
        results = self._predict_all(sources, names, batch_size, tta, heatmaps, workers, progress)
        return results[0] if one else results

    def _predict_all(self, sources: list, names: list[str], batch_size, tta, heatmaps, workers,
                     progress) -> list[Prediction]:
        results: list[Prediction | None] = [None] * len(sources)
        batch, batch_idx = [], []

        def flush():
            if not batch:
                return
            x = np.stack(batch)
            z, cam, s, zk, zs = self.run_all_tta(x, batch_size) if tta else self.run_all(x, batch_size)
            p, labels, ood = self.record.decide(z, s)
            kinds, _ = self.record.kinds(zk)
            stages, p_stage = self.record.stages(zs) if zs is not None else (None, None)
            finite = np.isfinite(z) & np.isfinite(s) & np.isfinite(cam).reshape(len(cam), -1).all(1)
            for extra in (zk, zs):
                if extra is not None:
                    finite &= np.isfinite(extra).all(1)
            for k, i in enumerate(batch_idx):
                if not finite[k]:  # a damaged model: an error for this image, never a label
                    results[i] = Prediction(names[i], error=NON_FINITE)
                    continue
                staged = stages is not None and labels[k] == self.record.positive
                results[i] = Prediction(names[i], str(labels[k]), float(p[k]), bool(ood[k]), float(s[k]),
                                        cam=cam[k] if heatmaps else None,
                                        kind=str(kinds[k]) if zk is not None else None,
                                        stage=str(stages[k]) if staged else None,
                                        p_stage=float(p_stage[k]) if staged else None)
            if progress:
                progress.update(len(batch))
            batch.clear()
            batch_idx.clear()

        with ThreadPoolExecutor(max(1, workers)) as ex:
            for i, (arr, err) in enumerate(self._decode_ahead(sources, ex, window=4 * batch_size)):
                if err:
                    results[i] = Prediction(names[i], error=err)
                    if progress:
                        progress.update(1)
                    continue
                batch.append(arr)
                batch_idx.append(i)
                if len(batch) >= batch_size:
                    flush()
            flush()
        return results

    def _decode_ahead(self, sources, ex, window: int):
        """Decoded images in input order, with at most `window` decodes in flight on the worker
        threads, so decoding overlaps inference and memory stays bounded for any number of files."""
        pending = deque()
        for src in sources:
            pending.append(ex.submit(self._decode, src))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()

    def predict_one(self, src, heatmap: bool = False, tta: bool = False) -> Prediction:
        """One image -> its Prediction (the same as `predict(src)` for one image)."""
        return self.predict([src], heatmaps=heatmap, tta=tta, workers=1)[0]

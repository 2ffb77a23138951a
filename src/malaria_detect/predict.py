"""Torch-free prediction: ONNX Runtime + NumPy + Pillow.

    pred = Predictor.load()                 # the bundled model; or Predictor.load("model.onnx")
    one = pred.predict("cell.png")          # -> Prediction (also bytes, a PIL image, an HxWx3 array)
    many = pred.predict(["cell.png", "cells/"], heatmaps=True)   # -> list[Prediction], folders expanded

The preprocessing (input size, mean/std, class names, threshold, temperature, not-a-cell
threshold) is read from the model file's metadata, never declared here.
"""

from __future__ import annotations

import hashlib
import os
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import IO, overload

import numpy as np
from PIL import Image

from .config import BUNDLED_NAMES, NAMES_HELP
from .data import IMAGE_EXTENSIONS
from .errors import MissingFileError, ModelError, UsageError
from .preprocess import ImageError, Record, RecordError, normalize, open_rgb, resize_uint8, shrink

# What `Predictor.predict` takes as one image.
ImageLike = str | os.PathLike | bytes | bytearray | memoryview | Image.Image | np.ndarray | IO[bytes]

BUNDLED_MODEL = BUNDLED_NAMES["nih"]
# the model trained for other labs' cells too (NIH + IML fields, stain/blur/zoom augmentation): the
# default of whole-field analysis (smear, POST /smear); see MODEL_CARD.md for why it is not the
# single-cell default as well
FIELD_MODEL = BUNDLED_NAMES["robust"]
# ONNX metadata key holding onnx_weights_sha256() of the file, written by export; checked at load.
WEIGHTS_KEY = "malaria_detect_weights_sha256"
NON_FINITE = "the model's output is not a finite number (NaN or infinity): the model file may be damaged"
HEATMAP_MAX_SIDE = 512  # heatmap overlays are at most this many pixels a side


def bundled_model_path() -> Path:
    return Path(str(resources.files("malaria_detect") / "assets" / BUNDLED_MODEL))


def bundled_field_model_path() -> Path:
    return bundled_model_path().with_name(FIELD_MODEL)


def model_path(model: str | Path | None) -> Path:
    """The file a `--model` value names: a path, a bundled model's name, or None (the bundled default)."""
    if model is None or str(model) == "":
        return bundled_model_path()
    path = Path(model)
    if not path.exists() and str(model) in BUNDLED_NAMES:  # a file of that name, if there is one, wins
        return bundled_model_path().with_name(BUNDLED_NAMES[str(model)])
    return path


def bundled_sha256_path(model: Path | None = None) -> Path:
    """A bundled model's expected sha256, checked at every load. After replacing a bundled model,
    refresh it: cd src/malaria_detect/assets && sha256sum malaria_lite0.onnx > malaria_lite0.onnx.sha256"""
    model = model or bundled_model_path()
    return model.with_name(model.name + ".sha256")


def _varint(b: bytes, i: int) -> tuple[int, int]:
    v = shift = 0
    while True:
        if i >= len(b) or shift > 63:
            raise ValueError("truncated protobuf varint")
        v |= (b[i] & 0x7F) << shift
        i += 1
        if not b[i - 1] & 0x80:
            return v, i
        shift += 7


def _top_fields(blob: bytes):
    """(field number, start, end) of each top-level protobuf field of an ONNX file."""
    i = 0
    while i < len(blob):
        start = i
        key, i = _varint(blob, i)
        wire = key & 7
        if wire == 0:
            _, i = _varint(blob, i)
        elif wire == 2:
            n, i = _varint(blob, i)
            i += n
        elif wire in (1, 5):
            i += 8 if wire == 1 else 4
        else:
            raise ValueError(f"not an ONNX protobuf (wire type {wire})")
        if i > len(blob):
            raise ValueError("truncated ONNX protobuf")
        yield key >> 3, start, i


def onnx_weights_sha256(blob: bytes) -> str:
    """sha256 of an ONNX file's top-level protobuf fields except metadata_props (field 14): the graph
    with all its weights, the opsets and the producer, but not the metadata that carries this hash.
    Standard library only (the prediction path has no `onnx` package)."""
    h, view = hashlib.sha256(), memoryview(blob)
    for num, start, end in _top_fields(blob):
        if num != 14:
            h.update(view[start:end])
    return h.hexdigest()


def _put_varint(v: int) -> bytes:
    out = bytearray()
    while True:
        out.append((v & 0x7F) | (0x80 if v > 0x7F else 0))
        v >>= 7
        if not v:
            return bytes(out)


def _len_field(num: int, payload: bytes) -> bytes:
    return _put_varint(num << 3 | 2) + _put_varint(len(payload)) + payload


def write_model_record(path: str | Path, record: Record) -> None:
    """Store the (validated) record and the weights hash as the ONNX file's metadata (replacing what
    was there); the graph and weights are copied byte for byte. Standard library only, so `adapt`
    and `export` share it and neither needs the `onnx` package to write a model."""
    record.validate()
    path = Path(path)
    blob = path.read_bytes()
    kept = b"".join(blob[a:b] for num, a, b in _top_fields(blob) if num != 14)
    meta = {"malaria_detect_record": record.to_json(), "producer": "malaria-detect",
            WEIGHTS_KEY: onnx_weights_sha256(blob)}
    entries = b"".join(_len_field(14, _len_field(1, k.encode()) + _len_field(2, v.encode())) for k, v in meta.items())
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(kept + entries)
    tmp.replace(path)


def _check_bundled(path: Path, blob: bytes) -> None:
    """The bundled models must match the sha256 stored next to them."""
    if path.resolve() not in (bundled_model_path().resolve(), bundled_field_model_path().resolve()):
        return
    ref = bundled_sha256_path(path)
    if not ref.is_file():
        raise ModelError(f"{path}: {ref.name} is missing, the bundled model cannot be verified")
    want = (ref.read_text().split() or [""])[0].lower()
    got = hashlib.sha256(blob).hexdigest()
    if got != want:
        raise ModelError(f"{path}: sha256 {got[:16]}... does not match {ref.name} ({want[:16]}...): "
                         f"the bundled model is damaged or was replaced without refreshing {ref.name}")


def _check_weights(path: Path, blob: bytes, meta: dict) -> None:
    """A model that carries a weights hash (every export since it was added) must match it."""
    if WEIGHTS_KEY in meta:
        try:
            got = onnx_weights_sha256(blob)
        except ValueError as e:
            raise ModelError(f"{path}: {e}") from None
        if got != meta[WEIGHTS_KEY]:
            raise ModelError(f"{path}: its weights do not match the hash stored in it: the file is damaged")


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

    def to_dict(self) -> dict:
        """Typed values, as JSON writes them: None where there is no value."""
        return {"path": self.source, "label": self.label, "p_parasitized": self.p_parasitized, "ood": self.ood,
                "error": self.error}

    def row(self) -> dict:
        """The same keys as strings, as CSV writes them ("" where there is no value)."""
        return {"path": self.source, "label": self.label or "",
                "p_parasitized": "" if self.p_parasitized is None else f"{self.p_parasitized:.6f}",
                "ood": "" if self.ood is None else str(self.ood).lower(), "error": self.error or ""}


def tally(answers: Iterable[tuple[str | None, bool | None]], positive: str) -> dict:
    """The one rule for counting (label, ood) answers, whether images of a folder or cells of a field:
    answers flagged not a cell, and answers without a label (unreadable, or a score that is not a
    finite number), are counted apart and left out of the parasitized fraction, whose denominator is
    the classified cells only."""
    answers = list(answers)
    classified = [label for label, ood in answers if label is not None and not ood]
    k = sum(label == positive for label in classified)
    return {"n": len(answers), "n_classified": len(classified), "n_positive": k,
            "n_not_a_cell": sum(bool(ood) for label, ood in answers if label is not None),
            "n_unlabelled": sum(label is None for label, _ in answers),
            "fraction": k / len(classified) if classified else None}


def iter_image_paths(paths: Iterable[str | Path]) -> Iterator[Path]:
    """Files as given, folders recursively (image extensions only), in a stable order."""
    for p in paths:
        p = Path(p)
        if p.is_dir():
            yield from sorted(q for q in p.rglob("*") if q.is_file() and q.suffix.lower() in IMAGE_EXTENSIONS)
        else:
            yield p  # a missing or non-image file is reported in its row


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
    then `predict(image)` -> Prediction, `predict([images or folders])` -> list[Prediction], and
    `smear([field images])` for whole microscope fields."""

    def __init__(self, session, record: Record, path: Path):
        self.session, self.record, self.path = session, record, path

    @classmethod
    def load(cls, path: str | Path | None = None, threads: int | None = None) -> Predictor:
        import onnxruntime as ort

        path = model_path(path)
        if not path.is_file():
            raise MissingFileError(f"{path}: model file not found (give an .onnx file, {NAMES_HELP})")
        blob = path.read_bytes()
        _check_bundled(path, blob)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or os.cpu_count() or 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
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
        return cls(session, record, path)

    # ------------------------------------------------------------ arrays

    def run(self, x_uint8: np.ndarray, batch_size: int = 64):
        """(N,S,S,3) uint8 at the model's input size -> (logits, cams, ood_scores)."""
        outs = [self.session.run(None, {"image": normalize(x_uint8[i:i + batch_size], self.record)})
                for i in range(0, len(x_uint8), batch_size)]
        if not outs:
            return np.zeros(0, np.float32), np.zeros((0, *self.cam_shape()), np.float32), np.zeros(0, np.float32)
        return tuple(np.concatenate([o[j] for o in outs]) for j in range(3))

    def cam_shape(self) -> tuple[int, int]:
        """(h, w) of one image's CAM: from the graph's declared output shape, else by running one image."""
        shape = self.session.get_outputs()[1].shape[1:]
        if len(shape) == 2 and all(isinstance(d, int) for d in shape):
            return tuple(shape)
        s = self.record.input_size
        return self.run(np.zeros((1, s, s, 3), np.uint8))[1].shape[1:]

    def run_tta(self, x_uint8: np.ndarray, batch_size: int = 64):
        """Average logits and scores over the 8 flips/rotations of the square input (CAM: identity view)."""
        logits, scores = [], []
        cams = None
        for k in range(4):
            for flip in (False, True):
                v = np.rot90(x_uint8, k, axes=(1, 2))
                v = v[:, :, ::-1] if flip else v
                z, c, s = self.run(np.ascontiguousarray(v), batch_size)
                logits.append(z)
                scores.append(s)
                if cams is None:
                    cams = c
        return np.mean(logits, 0), cams, np.mean(scores, 0)

    def probability(self, logits: np.ndarray) -> np.ndarray:
        return self.record.probability(logits)

    def decide(self, logits, ood_scores):
        return self.record.decide(logits, ood_scores)

    # ------------------------------------------------------------ images

    def _decode(self, src):
        if not is_image_like(src):
            return None, f"not an image: {type(src).__name__}"
        try:
            img = open_rgb(src)
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
            z, cam, s = self.run_tta(x, batch_size) if tta else self.run(x, batch_size)
            p, labels, ood = self.record.decide(z, s)
            finite = np.isfinite(z) & np.isfinite(s) & np.isfinite(cam).reshape(len(cam), -1).all(1)
            for k, i in enumerate(batch_idx):
                if not finite[k]:  # a damaged model: an error for this image, never a label
                    results[i] = Prediction(names[i], error=NON_FINITE)
                    continue
                results[i] = Prediction(names[i], str(labels[k]), float(p[k]), bool(ood[k]), float(s[k]),
                                        cam=cam[k] if heatmaps else None)
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

    def smear(self, fields, **options) -> dict:
        """Whole microscope fields (images or folders of them) -> the `malaria-detect smear --json`
        report: every red cell with its box and answer, counts and parasitemia per field and pooled.
        `options` are those of `smear.SmearOptions` (cell_diameter, batch_size, rbc_per_ul)."""
        from .smear import SmearOptions, analyze_fields  # OpenCV loads with the first field, not here

        return analyze_fields(self, fields, SmearOptions(**options))


# ---------------------------------------------------------------- heatmaps

# matplotlib's 'inferno' at 33 evenly spaced points (RGB 0-255): perceptually uniform, readable in
# greyscale and by colour-blind readers; black = no evidence, pale yellow = strongest. The web page's
# legend (static/style.css, --inferno) uses the same colours.
_INFERNO = np.array([
    0, 0, 4, 4, 3, 18, 11, 7, 36, 21, 11, 55, 33, 12, 74, 47, 10, 91, 61, 9, 101, 74, 12, 107,
    87, 16, 110, 100, 21, 110, 113, 25, 110, 125, 30, 109, 138, 34, 106, 151, 39, 102, 163, 44, 97, 176, 49, 91,
    188, 55, 84, 199, 62, 76, 210, 70, 68, 219, 80, 59, 228, 90, 49, 235, 102, 40, 241, 115, 29, 246, 128, 19,
    249, 142, 9, 251, 157, 7, 252, 172, 17, 251, 188, 33, 249, 203, 53, 245, 219, 76, 242, 234, 105, 243, 246, 138,
    252, 255, 164], np.float32).reshape(33, 3)


def _colormap(v: np.ndarray) -> np.ndarray:
    """Value in [0,1] -> RGB uint8 on the 'inferno' scale (linear between the table's points)."""
    x = np.clip(np.asarray(v, np.float32), 0, 1) * (len(_INFERNO) - 1)
    i = np.minimum(x.astype(np.int64), len(_INFERNO) - 2)
    f = (x - i)[..., None]
    return ((1 - f) * _INFERNO[i] + f * _INFERNO[i + 1] + 0.5).astype(np.uint8)


def cam_to_map(cam: np.ndarray, size: tuple[int, int], temperature: float | None = None) -> np.ndarray:
    """Upsample a raw CAM to (h, w) = size[::-1], as values in [0, 1].

    With `temperature`: only evidence *for* parasitized is coloured, relative to the strongest
    location but never less than a logit contribution of 3 T (p = 0.95), so an uninfected cell with
    a faint positive spot stays cool while a parasitized cell shows where its evidence peaks.
    Without it the map is min-max scaled."""
    c = np.asarray(cam, np.float32)
    if temperature:
        c = np.clip(c, 0, None) / max(float(c.max()), 3.0 * temperature)
    else:
        c = c - c.min()
        c = c / c.max() if c.max() > 0 else c
    img = Image.fromarray(c.astype(np.float32), mode="F").resize(size, Image.BILINEAR)  # no overshoot
    return np.clip(np.asarray(img, np.float32), 0, 1)


def cam_peak_xy(cam: np.ndarray, size: tuple[int, int]) -> tuple[int, int]:
    """Image coordinates (x, y) of the strongest CAM location: the centre of that feature-map cell's
    footprint in an image of `size` = (width, height)."""
    i, j = np.unravel_index(int(np.argmax(cam)), cam.shape)
    h, w = cam.shape
    return int((j + 0.5) / w * size[0]), int((i + 0.5) / h * size[1])


def heatmap_overlay(src, cam: np.ndarray, temperature: float | None = None, alpha: float = 0.5,
                    min_size: int = 192, max_size: int = HEATMAP_MAX_SIDE) -> Image.Image:
    """The cell with its class-activation map blended on top (PIL RGB image, at most `max_size`
    pixels a side); the black surround of a segmented cell is left as it is."""
    img = shrink(src if isinstance(src, Image.Image) else open_rgb(src), max_size)
    if min(img.size) < min_size:  # upscale small crops so the overlay is readable
        s = min_size / min(img.size)
        img = img.resize((round(img.width * s), round(img.height * s)), Image.BICUBIC)
    heat = _colormap(cam_to_map(cam, img.size, temperature)).astype(np.float32)
    base = np.asarray(img, np.float32)
    a = alpha * (base.mean(-1, keepdims=True) > 12)
    out = (1 - a) * base + a * heat
    return Image.fromarray(out.clip(0, 255).astype(np.uint8))

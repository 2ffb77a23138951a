"""Model files: the bundled models by name, the ONNX metadata that carries a model's record and its
weights hash (written and read with the standard library: the prediction path has no `onnx`
package), and the checks made at every load (the bundled models' sha256, the weights hash).
"""

from __future__ import annotations

import hashlib
from importlib import resources
from pathlib import Path

from .errors import ModelError
from .record import Record

OBJECT_OOD = "object_ood_score"  # the whole-field path's not-a-cell score (training/objectnet.add_object_ood)
FIELD_OUTPUTS = ["object_logits", OBJECT_OOD, "kind_logits", "stage_logits"]  # what a field's objects read

# the bundled models by name, wherever `--model` (or `model=`) takes a model file (model_path)
BUNDLED_NAMES = {"nih": "malaria_lite0.onnx", "robust": "malaria_lite0_robust.onnx", "anylab": "malaria_anylab.onnx"}

NAMES_HELP = ("or a bundled model by name: 'anylab' (the default everywhere: single cells by its cell head; "
              "every object of a field, red cell with stage, white cell, platelet, other, by its whole-field "
              "heads), 'robust' (its backbone and cell head alone) or 'nih' (NIH cells only; the single-cell "
              "default before anylab)")

# the default everywhere (predict, evaluate, adapt, serve, smear, POST /smear, Ray): the robust model's
# backbone, not-a-cell flag and cell head, with heads for every object of a field beside them
# (training/heads.py; its field threshold chosen so that malaria-free smears of other labs stay negative).
# 'nih' and 'robust' stay bundled as the baselines it is measured against (MODEL_CARD.md).
BUNDLED_MODEL = BUNDLED_NAMES["anylab"]
FIELD_MODEL = BUNDLED_NAMES["anylab"]

# ONNX metadata key holding onnx_weights_sha256() of the file, written by export; checked at load.
WEIGHTS_KEY = "malaria_detect_weights_sha256"


def bundled_model_path() -> Path:
    return Path(str(resources.files("malaria_detect") / "assets" / BUNDLED_MODEL))


def bundled_field_model_path() -> Path:
    return bundled_model_path().with_name(FIELD_MODEL)


# the learned object detector of whole fields (training/detector.py), by name wherever --detector takes one
BUNDLED_DETECTOR = "cells_detector.onnx"


def detector_path(detector: str | Path) -> Path:
    """The file a `--detector` value names: a path, or 'bundled' (a file of that name wins)."""
    path = Path(detector)
    if not path.exists() and str(detector) == "bundled":
        return bundled_model_path().with_name(BUNDLED_DETECTOR)
    return path


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
    refresh it: cd src/malaria_detect/assets && sha256sum malaria_anylab.onnx > malaria_anylab.onnx.sha256"""
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


def _fields(blob):
    """(field number, the field's bytes, its payload when length-delimited) of a protobuf message; views
    into `blob`, never copies (a model's weights are most of its bytes)."""
    blob = memoryview(blob)
    for num, start, end in _top_fields(blob):
        key, i = _varint(blob, start)
        payload = None
        if key & 7 == 2:
            _, i = _varint(blob, i)
            payload = blob[i:end]
        yield num, blob[start:end], payload


def _strings(blob: bytes, num: int) -> list[str]:
    return [bytes(p).decode() for n, _, p in _fields(blob) if n == num and p is not None]


def pruned_graph(blob: bytes, outputs: list[str]) -> bytes:
    """An ONNX file's bytes with only the nodes, weights and outputs that `outputs` need (ONNX Runtime runs
    every node of a graph whatever outputs are asked for). Standard library only; a graph's nodes are in
    topological order (ONNX requires it), so one pass backwards finds what is needed."""
    model = list(_fields(blob))
    graph = next((p for n, _, p in model if n == 7), None)
    if graph is None:
        raise ValueError("not an ONNX model (no graph)")
    parts = list(_fields(graph))
    have = {_strings(p, 1)[0] for n, _, p in parts if n == 12}
    if missing := set(outputs) - have:
        raise ValueError(f"the graph has no output {', '.join(sorted(missing))}")
    need, keep = set(outputs), set()
    for k in range(len(parts) - 1, -1, -1):
        n, _, p = parts[k]
        if n == 1 and need & set(_strings(p, 2)):  # NodeProto: input 1, output 2
            keep.add(k)
            need |= set(_strings(p, 1))
    out = []
    for k, (n, raw, p) in enumerate(parts):
        if (n == 1 and k not in keep) or (n == 12 and _strings(p, 1)[0] not in outputs) \
                or (n in (5, 11) and _strings(p, 8 if n == 5 else 1)[0] not in need):  # weights, inputs unused
            continue
        out.append(raw)
    return b"".join(_len_field(7, b"".join(out)) if n == 7 else raw for n, raw, _ in model)


def whole_field_graph(blob: bytes, path, outputs: list[str]) -> bytes | None:
    """The model's graph pruned to FIELD_OUTPUTS, the outputs a field's objects read (Predictor.run_fields);
    None for a graph made before it had `object_ood_score` (given its `outputs`): the full graph serves."""
    if OBJECT_OOD not in outputs:
        return None
    try:
        return pruned_graph(blob, FIELD_OUTPUTS)
    except ValueError as e:
        raise ModelError(f"{path}: its whole-field outputs cannot be read apart: {e}") from None


def write_metadata(path: str | Path, entries: dict[str, str]) -> None:
    """Store `entries` and the weights hash as the ONNX file's metadata (replacing what was there); the
    graph and weights are copied byte for byte. Standard library only."""
    path = Path(path)
    blob = path.read_bytes()
    kept = b"".join(blob[a:b] for num, a, b in _top_fields(blob) if num != 14)
    meta = {**entries, "producer": "malaria-detect", WEIGHTS_KEY: onnx_weights_sha256(blob)}
    out = b"".join(_len_field(14, _len_field(1, k.encode()) + _len_field(2, v.encode())) for k, v in meta.items())
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(kept + out)
    tmp.replace(path)


def write_model_record(path: str | Path, record: Record) -> None:
    """Store the (validated) record and the weights hash as the ONNX file's metadata, so `adapt` and
    `export` share it and neither needs the `onnx` package to write a model."""
    record.validate()
    write_metadata(path, {"malaria_detect_record": record.to_json()})


def check_weights(path: Path, meta: dict) -> None:
    """A model file as it is now: a bundled one must match its sha256 file, and any that carries a
    weights hash must match it."""
    blob = path.read_bytes()
    _check_bundled(path, blob)
    _check_weights(path, blob, meta)


def _check_bundled(path: Path, blob: bytes) -> None:
    """The bundled models must match the sha256 stored next to them."""
    assets = bundled_model_path().parent
    bundled = [assets / name for name in (*BUNDLED_NAMES.values(), BUNDLED_DETECTOR)]
    if path.resolve() not in {b.resolve() for b in bundled}:
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


def read_metadata(path: str | Path) -> dict[str, str]:
    """An ONNX file's metadata (key -> value), read without loading the graph into ONNX Runtime."""
    blob = Path(path).read_bytes()
    out = {}
    for num, start, end in _top_fields(blob):
        if num != 14:
            continue
        entry = blob[start:end]
        _, i = _varint(entry, 0)      # the field's key
        _, i = _varint(entry, i)      # its length
        kv = {}
        for sub, a, b in _top_fields(entry[i:]):
            body = entry[i + a:i + b]
            _, j = _varint(body, 0)
            _, j = _varint(body, j)
            kv[sub] = body[j:].decode("utf-8", "replace")
        out[kv.get(1, "")] = kv.get(2, "")
    return out


def available_models() -> dict[str, dict]:
    """The bundled models by name -> {"file", "path", "default_for", "record"} (the record as stored in the
    file: classes, operating points, provenance), without starting ONNX Runtime."""
    out = {}
    for name, file in BUNDLED_NAMES.items():
        path = bundled_model_path().with_name(file)
        record = Record.from_json(read_metadata(path)["malaria_detect_record"])
        out[name] = {"file": file, "path": str(path), "record": record,
                     "default_for": [what for what, default in (("single cells", BUNDLED_MODEL),
                                                                ("whole fields", FIELD_MODEL)) if file == default]}
    return out

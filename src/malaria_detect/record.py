"""The model's record: everything needed to use a model, stored inside the model file (ONNX metadata,
checkpoint metadata) and read back by every consumer, and the one rule that turns the network's
outputs into answers (`Record.decide`). No other module declares these numbers.

NumPy only.
"""

from __future__ import annotations

import json
import math
from dataclasses import MISSING, asdict, dataclass, field, fields

import numpy as np

from .errors import MalariaDetectError

# A model's network input side must lie in this range (pixels): a record asking for 20,000 is refused.
INPUT_SIZE_RANGE = (16, 1024)
RED_CELL = "red cell"  # the object kind that is classified and counted
KIND_MIN_P = 0.9       # an object is another kind than a red cell only at this probability or more (chosen on
                       # validation objects: at 0.5, 2.5 % of red cells were lost, at 0.9 0.4 %)

STAIN_MAP = "od-diagonal-1"  # the one stain map a record may ask the whole-field path for (fields/stain.py)


class RecordError(MalariaDetectError, ValueError):
    """A model's preprocessing record is missing a value or has one that cannot be right."""


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def softmax(z) -> np.ndarray:
    z = np.asarray(z, np.float64)
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def sigmoid(z):
    z = np.asarray(z, np.float64)
    return 1.0 / (1.0 + np.exp(-np.clip(z, -60, 60)))


@dataclass
class Record:
    """Everything needed to use a model, stored inside it, and the one rule that turns the network's
    outputs into answers (`probability`, `decide`): no other module re-codes it.

    Images are always squashed to input_size x input_size with Pillow's bilinear filter
    (`resize_uint8`). Model files written before this was fixed carry the key `"resize": "bilinear"`;
    it is accepted when read and no longer written."""

    arch: str
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    class_names: tuple[str, str] = ("Uninfected", "Parasitized")  # index 1 is the positive class
    threshold: float = 0.5          # on the calibrated p_parasitized
    temperature: float = 1.0        # p = sigmoid(logit / temperature)
    ood_threshold: float | None = None  # feature-space distance above which an input is "not a cell"
    kind_names: tuple[str, ...] = ()   # the object kinds of the `kind_logits` output (empty: no such output)
    stage_names: tuple[str, ...] = ()  # the life stages of the `stage_logits` output (empty: none)
    # the whole-field head of a model that has one beside its cell head (graph output `object_logits`,
    # fitted on the objects of fields by train-heads): {"temperature", "threshold", ...}; None: one head
    object_head: dict | None = None
    stain_norm: str | None = None   # the stain map (STAIN_MAP) whole fields get before their cells are cut
    extra: dict = field(default_factory=dict)  # provenance: split, data hash, config, metrics, git

    # written only when set, so that a model without them keeps its record as it was, and a release
    # that does not know them refuses such a model ("unknown record keys") instead of misusing it
    OPTIONAL = ("object_head", "stain_norm")

    def to_json(self) -> str:
        d = asdict(self)
        for k in self.OPTIONAL:
            if d[k] is None:
                del d[k]
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> Record:
        """Parse and validate a stored record; raises RecordError with a one-line message."""
        try:
            d = json.loads(text)
        except (ValueError, TypeError) as e:
            raise RecordError(f"the record is not valid JSON ({e})") from None
        if not isinstance(d, dict):
            raise RecordError("the record is not a JSON object")
        if "resize" in d:  # older model files: the only resize there ever was
            if d["resize"] != "bilinear":
                raise RecordError(f"resize must be 'bilinear', got {d['resize']!r}")
            del d["resize"]
        known = {f.name for f in fields(cls)}
        if set(d) - known:
            raise RecordError(f"unknown record keys: {', '.join(sorted(set(d) - known))}")
        required = {f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING}
        if required - set(d):
            raise RecordError(f"missing record keys: {', '.join(sorted(required - set(d)))}")
        for k in ("mean", "std", "class_names", "kind_names", "stage_names"):
            if isinstance(d.get(k), list):
                d[k] = tuple(d[k])
        record = cls(**d)
        record.validate()
        return record

    def validate(self) -> Record:
        """Raise RecordError unless every number the prediction path uses is usable."""
        def bad(what):
            raise RecordError(what)

        if not isinstance(self.arch, str) or not self.arch:
            bad(f"arch must be a name, got {self.arch!r}")
        lo, hi = INPUT_SIZE_RANGE
        if not isinstance(self.input_size, int) or isinstance(self.input_size, bool) or \
                not lo <= self.input_size <= hi:
            bad(f"input_size must be an integer from {lo} to {hi} pixels, got {self.input_size!r}")
        for name in ("mean", "std"):
            v = getattr(self, name)
            if not isinstance(v, (tuple, list)) or len(v) != 3 or not all(_finite(x) for x in v):
                bad(f"{name} must be 3 finite numbers (R, G, B), got {v!r}")
        if not all(x > 0 for x in self.std):
            bad(f"std must be > 0 for every channel, got {self.std!r}")
        c = self.class_names
        if not isinstance(c, (tuple, list)) or len(c) != 2 or not all(isinstance(x, str) and x for x in c) \
                or c[0] == c[1]:
            bad(f"class_names must be 2 different names (negative, positive), got {c!r}")
        for name in ("kind_names", "stage_names"):
            v = getattr(self, name)
            if not isinstance(v, (tuple, list)) or not all(isinstance(x, str) and x for x in v) or \
                    len(set(v)) != len(v):
                bad(f"{name} must be different names, got {v!r}")
        if self.kind_names and self.kind_names[0] != RED_CELL:
            bad(f"kind_names must start with {RED_CELL!r} (the kind that is counted), got {self.kind_names!r}")
        if not _finite(self.threshold) or not 0 < self.threshold < 1:
            bad(f"threshold must be between 0 and 1 (exclusive), got {self.threshold!r}")
        if not _finite(self.temperature) or self.temperature <= 0:
            bad(f"temperature must be a finite number > 0, got {self.temperature!r}")
        if self.ood_threshold is not None and not _finite(self.ood_threshold):
            bad(f"ood_threshold must be a finite number or null, got {self.ood_threshold!r}")
        if not isinstance(self.extra, dict):
            bad(f"extra must be an object, got {type(self.extra).__name__}")
        h = self.object_head
        if h is not None and not (isinstance(h, dict) and _finite(h.get("temperature")) and h["temperature"] > 0
                                  and _finite(h.get("threshold")) and 0 < h["threshold"] < 1):
            bad(f"object_head must hold a temperature > 0 and a threshold between 0 and 1, got {h!r}")
        if self.stain_norm not in (None, STAIN_MAP):
            bad(f"stain_norm names a stain map this version does not have ({self.stain_norm!r}; it has "
                f"{STAIN_MAP!r}): use the version of malaria-detect the model was made with")
        return self

    # ------------------------------------------------------------ the decision rule

    @property
    def positive(self) -> str:
        """The positive class's name (index 1: "Parasitized" for the models this project trains)."""
        return self.class_names[1]

    @property
    def negative(self) -> str:
        return self.class_names[0]

    def probability(self, logits, temperature: float | None = None) -> np.ndarray:
        """Calibrated p(positive) = sigmoid(logit / temperature), float64 (the record's temperature, or
        another head's such as `field_temperature`)."""
        return sigmoid(np.asarray(logits, np.float64) / (self.temperature if temperature is None else temperature))

    @property
    def field_temperature(self) -> float:
        """The temperature of the logits whole fields are decided on (the object head's, when there is one)."""
        return float(self.object_head["temperature"]) if self.object_head else self.temperature

    @property
    def field_cell_threshold(self) -> float:
        """The cell threshold of the head whole fields are decided on (the object head's, when there is
        one); a field threshold of its own, where chosen, is `extra.field_threshold`."""
        return float(self.object_head["threshold"]) if self.object_head else self.threshold

    @property
    def second_opinion(self) -> tuple[float, float] | None:
        """(object, cell) of `extra.field_second_opinion` (chosen by `field-threshold` on validation fields),
        for a model with a whole-field head beside its cell head; else None. A red cell of a field whose
        whole-field p is at least `object` but under the field threshold is shown to the cell head too,
        and is parasitized when the cell head's p is at least `cell` (`field_labels`)."""
        so = self.extra.get("field_second_opinion") if self.object_head else None
        return (float(so["object"]), float(so["cell"])) if so else None

    def second_opinion_p(self, cell_logits) -> np.ndarray:
        """The cell head's p as the second opinion reads it: at the cell temperature it was chosen with
        (`extra.field_second_opinion.temperature`), so that `adapt`, which refits the cell head's
        temperature for single cells, leaves whole fields' decisions where they were."""
        so = self.extra.get("field_second_opinion") or {}
        return self.probability(cell_logits, so.get("temperature"))

    def second_opinion_asked(self, p, threshold: float) -> np.ndarray:
        """Where the cell head is asked (`second_opinion`): object <= p < threshold; nowhere without one."""
        p = np.asarray(p, np.float64)
        so = self.second_opinion
        return np.zeros(p.shape, bool) if so is None else (p >= so[0]) & (p < threshold)

    def field_labels(self, p, p_cell, threshold: float) -> np.ndarray:
        """The labels of a field's red cells: positive where the whole-field p >= threshold, or where the
        second opinion was asked (`second_opinion_asked`) and the cell head's p_cell >= its `cell` (NaN
        where it was not asked)."""
        p, p_cell = np.asarray(p, np.float64), np.asarray(p_cell, np.float64)
        pos = p >= threshold
        so = self.second_opinion
        if so is not None:
            with np.errstate(invalid="ignore"):
                pos |= self.second_opinion_asked(p, threshold) & (p_cell >= so[1])
        return np.where(pos, self.positive, self.negative)

    def is_ood(self, ood_scores) -> np.ndarray:
        """True where the not-a-cell score is above the record's threshold (never, without one)."""
        s = np.asarray(ood_scores, np.float64)
        return np.zeros(s.shape, bool) if self.ood_threshold is None else s > self.ood_threshold

    def labels(self, p, threshold: float | None = None) -> np.ndarray:
        """The positive class where p >= threshold (the record's, or another operating point such as a
        whole-field one), else the negative one."""
        thr = self.threshold if threshold is None else threshold
        return np.where(np.asarray(p, np.float64) >= thr, self.positive, self.negative)

    def kinds(self, kind_logits) -> tuple[np.ndarray, np.ndarray]:
        """What each object is (softmax argmax over `kind_names`) and that probability; without object
        heads every object is a red cell (p = 1)."""
        if kind_logits is None or not self.kind_names:
            n = 0 if kind_logits is None else len(kind_logits)
            return np.full(n, RED_CELL, object), np.ones(n)
        p = softmax(kind_logits)
        k = p.argmax(1)
        k[p[np.arange(len(k)), k] < KIND_MIN_P] = 0  # an object is a red cell unless another kind is likely
        return np.array(self.kind_names, object)[k], p[np.arange(len(k)), k]

    def stages(self, stage_logits) -> tuple[np.ndarray, np.ndarray]:
        """The life stage of each (parasitized) cell and its probability (softmax argmax over stage_names)."""
        p = softmax(stage_logits)
        k = p.argmax(1)
        return np.array(self.stage_names, object)[k], p[np.arange(len(k)), k]

    def decide(self, logits, ood_scores=None, threshold: float | None = None, temperature: float | None = None):
        """Logits (and not-a-cell scores) -> (p, labels, ood): p = sigmoid(z / T), `labels(p, threshold)`,
        ood from `is_ood` (all False without scores)."""
        p = self.probability(logits, temperature)
        labels = self.labels(p, threshold)
        ood = self.is_ood(ood_scores) if ood_scores is not None else np.zeros(p.shape, bool)
        return p, labels, ood

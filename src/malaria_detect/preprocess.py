"""The preprocessing record and the one image -> array path shared by training and inference.

NumPy + Pillow only. A `Record` is written into every saved model (safetensors JSON sidecar,
ONNX metadata) and read back by every consumer; no other module declares these numbers.
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

# Refuse images that declare more pixels than this before decoding them (decompression bombs).
MAX_IMAGE_PIXELS = 40_000_000
# open_rgb() checks every image's declared size itself (with a clear message) before decoding;
# Pillow's own warning/error at other sizes is switched off so there is one rule, not two.
Image.MAX_IMAGE_PIXELS = None


class ImageError(Exception):
    """An input that is not a readable image; the message says why."""


@dataclass
class Record:
    """Everything needed to use a model, stored inside it."""

    arch: str
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    class_names: tuple[str, str] = ("Uninfected", "Parasitized")  # index 1 is the positive class
    threshold: float = 0.5          # on the calibrated p_parasitized
    temperature: float = 1.0        # p = sigmoid(logit / temperature)
    ood_threshold: float | None = None  # feature-space distance above which an input is "not a cell"
    resize: str = "bilinear"        # whole image squashed to input_size x input_size
    extra: dict = field(default_factory=dict)  # provenance: split, data hash, config, metrics, git

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> "Record":
        d = json.loads(text)
        d["mean"], d["std"], d["class_names"] = tuple(d["mean"]), tuple(d["std"]), tuple(d["class_names"])
        return cls(**d)


def open_rgb(src, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Open a path, bytes or file object as an RGB image; raises ImageError with a clear message.

    The pixel count is checked from the header, before anything is decoded, so a small file that
    declares a huge image (a decompression bomb) is refused without allocating it."""
    if isinstance(src, Image.Image):  # already decoded (e.g. by the web app)
        return src if src.mode == "RGB" else src.convert("RGB")
    try:
        if isinstance(src, (bytes, bytearray)):
            if not src:
                raise ImageError("empty file (0 bytes)")
            src = io.BytesIO(src)
        elif isinstance(src, (str, Path)) and Path(src).is_file() and Path(src).stat().st_size == 0:
            raise ImageError("empty file (0 bytes)")
        with Image.open(src) as im:
            w, h = im.size
            if w * h > max_pixels:
                raise ImageError(f"image too large: {w}x{h} pixels (limit {max_pixels:,})")
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                im = im.convert("RGBA")
                bg = Image.new("RGBA", im.size, (0, 0, 0, 255))  # NIH crops have a black surround
                im = Image.alpha_composite(bg, im)
            return im.convert("RGB")
    except ImageError:
        raise
    except FileNotFoundError:
        raise ImageError("file not found") from None
    except Image.DecompressionBombError as e:
        raise ImageError(f"image too large: {e}") from None
    except UnidentifiedImageError:
        raise ImageError("not an image Pillow can read (png, jpg, webp, tif, bmp)") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"cannot decode image: {e}") from None


def resize_uint8(img: Image.Image, size: int) -> np.ndarray:
    """RGB image -> (size, size, 3) uint8, the exact resize used in training and at inference."""
    return np.asarray(img.resize((size, size), Image.BILINEAR), dtype=np.uint8)


def normalize(batch_uint8: np.ndarray, record: Record) -> np.ndarray:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float32, scaled with the record's mean/std."""
    x = batch_uint8.astype(np.float32) * (1.0 / 255.0)
    x = (x - np.asarray(record.mean, np.float32)) / np.asarray(record.std, np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def load_uint8(src, size: int) -> np.ndarray:
    return resize_uint8(open_rgb(src), size)

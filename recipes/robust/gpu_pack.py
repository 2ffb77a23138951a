"""Pack the robust model's training set for a GPU machine that takes at most 64 MiB with the repo.

    .venv/bin/python recipes/robust/gpu_pack.py    # -> .gpu/pack.bin, pack_index.json, lite0_imagenet_fp16.safetensors

The train + validation patients of runs/data/combined (recipes/robust/robust_training_set.py), each image
resized to 112 px (as training resizes it) and stored as WebP quality 72 (~1 KB) in one file (26,053
small files would cost far more on the machine's file system), with an index (file, patient) and
the split; and the ImageNet weights of EfficientNet-Lite0 as fp16 safetensors without the 1000-class
layer (6.9 MB). Test patients and held-out fields are not packed. Add `/.gpu/` to .git/info/exclude.
Then, on the GPU machine: recipes/robust/gpu_train.py.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

from PIL import Image
from safetensors.torch import save_file

from malaria_detect import data as D
from malaria_detect.training.models import load_imagenet_state

ROOT = Path(__file__).resolve().parents[2]


def main(src: str = "runs/data/combined", out: str = ".gpu", quality: int = 72):
    out = Path(out)
    out.mkdir(exist_ok=True)
    items = D.find_images(src, Path(src) / "patients.csv")
    split = json.loads((Path(src) / "split.json").read_text())
    keep = D.select(items, split["parts"]["train"] + split["parts"]["val"])
    x, _, kept, _ = D.load_arrays(keep, 112, progress=False)
    rows, offsets, buf = [], [], bytearray()
    for a, it in zip(x, kept):
        b = io.BytesIO()
        Image.fromarray(a).save(b, "WEBP", quality=quality, method=4)
        offsets.append([len(buf), b.tell()])
        buf += b.getvalue()
        rows.append([f"{it.label_name}/{Path(it.path.name).stem}.webp", it.patient])
    (out / "pack.bin").write_bytes(bytes(buf))
    (out / "pack_index.json").write_text(json.dumps({"rows": rows, "offsets": offsets, "split": split}))
    st = load_imagenet_state("efficientnet_lite0")
    save_file({k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in st.items()
               if not k.startswith("_fc.")}, str(out / "lite0_imagenet_fp16.safetensors"))
    print(f"{len(rows)} images, {len(buf) / 1e6:.1f} MB")


if __name__ == "__main__":
    main()

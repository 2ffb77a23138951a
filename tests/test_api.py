"""The Python API a newcomer meets first: malaria_detect.load(), Predictor.predict on any image-like,
the record's decision rule, and nothing changed in the process at import."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import malaria_detect as md
from malaria_detect.cells.predictor import Prediction
from malaria_detect.errors import UsageError
from malaria_detect.record import Record, RecordError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cell(samples) -> Path:
    return sorted((samples / "Parasitized").iterdir())[0]


def test_public_face():
    assert md.__version__ == metadata.version("malaria-detect")
    assert set(md.__all__) >= {"load", "Predictor", "Prediction", "__version__"}
    assert isinstance(md.load(), md.Predictor)


def test_one_image_like_gives_one_prediction(bundled, cell):
    want = bundled.predict(str(cell))
    assert isinstance(want, Prediction) and want.source == str(cell) and want.error is None
    rgb = Image.open(cell).convert("RGB")
    same = {"Path": bundled.predict(cell), "bytes": bundled.predict(cell.read_bytes()),
            "file": bundled.predict(io.BytesIO(cell.read_bytes())), "PIL": bundled.predict(rgb),
            "array": bundled.predict(np.asarray(rgb))}
    for kind, r in same.items():
        assert isinstance(r, Prediction), kind
        assert r.label == want.label and r.p_parasitized == pytest.approx(want.p_parasitized, abs=1e-6), kind
    # in-memory images get a short readable name, never their repr
    assert same["bytes"].source == "<bytes 0>" and same["array"].source == "<array 0>"
    assert same["PIL"].source == "<PIL image 0>" and same["file"].source == "<file 0>"
    assert bundled.predict(Image.open(cell)).source == str(cell)  # a PIL image opened from a file: its name


def test_iterables_give_lists_and_are_consumed_once(bundled, samples, cell):
    gen = (p for p in [cell, cell.read_bytes()])
    out = bundled.predict(gen)
    assert [r.source for r in out] == [str(cell), "<bytes 1>"] and all(r.label for r in out)
    folder = samples / "Parasitized"
    n = len(list(folder.iterdir()))
    assert len(bundled.predict(folder)) == n                       # a folder: its images, as the CLI lists them
    mixed = bundled.predict([cell, folder, "missing.png"])
    assert len(mixed) == n + 2 and mixed[-1].error == "file not found"
    assert not any("Is a directory" in (r.error or "") for r in mixed)
    batch = np.stack([np.asarray(Image.open(cell).convert("RGB").resize((100, 100)))] * 3)
    assert len(bundled.predict(batch)) == 3                         # (N, H, W, 3): N images
    assert bundled.predict([]) == []


def test_bad_inputs_get_their_error_not_an_exception(bundled):
    bad = bundled.predict([np.zeros((4, 4, 3), np.float32), 42, b""])
    assert "uint8" in bad[0].error and bad[1].error == "not an image: int" and "0 bytes" in bad[2].error
    assert bad[1].source == "<int 1>"
    with pytest.raises(UsageError, match="2 names for 1 images"):
        bundled.predict(["a.png"], names=["x", "y"])


def test_smear_convenience(bundled):
    field = ROOT / "samples" / "fields" / "PA171771.JPG"
    rep = md.smear([field], model=bundled)
    assert rep["fields"][0]["n_cells"] > 50 and rep["model"]["class_names"] == list(bundled.record.class_names)
    default = md.smear([field])  # the bundled whole-field model
    assert default["model"]["file"] == md.available_models()["anylab"]["file"]


def test_available_models_list_the_bundled_models_with_their_records():
    models = md.available_models()
    assert set(models) == {"nih", "robust", "anylab"}
    for name, m in models.items():
        assert Path(m["path"]).is_file() and m["record"].class_names == ("Uninfected", "Parasitized")
        assert md.load(name).record == m["record"]  # the same record ONNX Runtime's metadata gives
    assert models["anylab"]["default_for"] == ["single cells", "whole fields"] and models["nih"]["default_for"] == []
    assert models["robust"]["default_for"] == [] and models["anylab"]["record"].kind_names[0] == "red cell"


def test_empty_input_gives_the_cams_real_shape(bundled):
    s = bundled.record.input_size
    one = bundled.run(np.zeros((1, s, s, 3), np.uint8))[1]
    none = bundled.run(np.zeros((0, s, s, 3), np.uint8))[1]
    assert none.shape == (0, *one.shape[1:])


def test_the_rule_and_the_class_names_live_on_the_record():
    r = Record(arch="x", input_size=64, mean=(0.5,) * 3, std=(0.5,) * 3, class_names=("healthy", "infected"),
               threshold=0.7, temperature=2.0, ood_threshold=3.0)
    p, labels, ood = r.decide([0.0, 2.0, 4.0], [1.0, 5.0, 2.0])
    assert np.allclose(p, 1 / (1 + np.exp(-np.array([0.0, 1.0, 2.0]))))
    assert list(labels) == ["healthy", "infected", "infected"] and list(ood) == [False, True, False]
    assert list(r.decide([2.0], threshold=0.8)[1]) == ["healthy"]   # another operating point
    assert r.positive == "infected" and list(r.decide([9.0])[2]) == [False]


def test_old_records_with_resize_still_load():
    new = json.loads(Record(arch="x", input_size=64, mean=(0.5,) * 3, std=(0.5,) * 3).to_json())
    assert "resize" not in new  # it was never read: no longer written
    assert Record.from_json(json.dumps(new | {"resize": "bilinear"})).input_size == 64
    with pytest.raises(RecordError, match="resize must be 'bilinear'"):
        Record.from_json(json.dumps(new | {"resize": "bicubic"}))


def test_importing_changes_no_global_pillow_setting():
    code = ("from PIL import Image; before = Image.MAX_IMAGE_PIXELS; import malaria_detect.cli, "
            "malaria_detect.serve.app, malaria_detect.fields.analysis; print(Image.MAX_IMAGE_PIXELS == before)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "True"

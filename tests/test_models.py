"""Models: real ImageNet weights, strict loading, the shared features/head interface."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from malaria_detect.training.models import create_model, imagenet_classifier, load_backbone_strict, load_imagenet_state


def test_imagenet_weights_are_real_chelsea_is_a_cat():
    """scikit-image's 'chelsea' photo must land in ImageNet's cat classes (281-285)."""
    from PIL import Image
    from skimage import data

    model, fc = imagenet_classifier("efficientnet_lite0")
    img = Image.fromarray(data.chelsea()).resize((224, 224), Image.BILINEAR)
    x = torch.from_numpy(np.asarray(img, np.float32) / 255).permute(2, 0, 1)[None]
    x = (x - 0.5) / 0.5  # the weights' convention, also stored in every Record
    with torch.no_grad():
        probs = fc(model.forward_features(x).mean((2, 3))).softmax(1)[0]
    top = int(probs.argmax())
    assert 281 <= top <= 285, top
    assert probs[281:286].sum() > 0.5


def test_strict_loading_rejects_mismatched_weights():
    model = create_model("efficientnet_lite0")
    state = load_imagenet_state("efficientnet_lite0")
    bad = dict(state)
    bad.pop("_blocks.3._bn1.running_var")
    with pytest.raises(RuntimeError, match="missing"):
        load_backbone_strict(model, bad)
    bad = dict(state)
    bad["_conv_head.weight"] = torch.zeros(10, 320, 1, 1)
    with pytest.raises(RuntimeError, match="shape_mismatch"):
        load_backbone_strict(model, bad)


def test_pretrained_backbone_equals_the_file():
    model = create_model("efficientnet_lite0", pretrained=True)
    state = load_imagenet_state("efficientnet_lite0")
    own = model.state_dict()
    assert all(torch.equal(own[k], v) for k, v in state.items() if not k.startswith("_fc."))


@pytest.mark.parametrize("name", ["efficientnet_lite0", "simple_cnn"])
def test_features_head_interface_and_exact_cam(name):
    model = create_model(name).eval()
    x = torch.randn(3, 3, 96, 96)
    with torch.no_grad():
        f = model.forward_features(x)
        z = model.forward_head(f)
        assert z.shape == (3,) and torch.allclose(z, model(x))
        # GAP + linear: the mean of the class-activation map equals the logit
        cam = torch.einsum("nchw,c->nhw", f, model.head.fc.weight[0]) + model.head.fc.bias[0]
        assert torch.allclose(cam.mean((1, 2)), z, atol=1e-4)


def test_unknown_architecture_and_pretrained_scratch():
    with pytest.raises(ValueError, match="unknown architecture"):
        create_model("resnet50")
    with pytest.raises(ValueError, match="no pretrained"):
        create_model("simple_cnn", pretrained=True)

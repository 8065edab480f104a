"""Backbones: reduced strides, loading weights from a local file, clear errors on bad files."""

import pytest
import torch
from torchvision.models import resnet18

from qpm_dist.config import ModelConfig
from qpm_dist.models.net import build_model


@pytest.mark.parametrize("arch, channels", [("resnet18", 512), ("resnet50", 2048)])
def test_reduced_strides_give_output_stride_8(arch, channels):
    x = torch.randn(1, 3, 64, 64)
    for reduced, side in ((True, 8), (False, 2)):
        model = build_model(ModelConfig(arch=arch, reduced_strides=reduced), num_classes=5).eval()
        out = model(x)
        assert out.feature_maps.shape == (1, channels, side, side)
        assert out.logits.shape == (1, 5)
        assert out.features.shape == (1, channels)


def test_tiny_resnet_shapes_and_norms():
    for norm in ("batch", "group"):
        model = build_model(ModelConfig(arch="tiny_resnet", norm=norm, tiny_width=8), num_classes=3).eval()
        out = model(torch.randn(2, 3, 64, 64))
        assert out.feature_maps.shape == (2, 32, 16, 16)
        assert (out.feature_maps >= 0).all()  # post-ReLU maps


def test_torchvision_checkpoint_loads_and_reproduces_torchvision(tmp_path):
    reference = resnet18(weights=None, num_classes=1000).eval()
    path = tmp_path / "resnet18.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in reference.state_dict().items()}}, path)
    model = build_model(ModelConfig(arch="resnet18", reduced_strides=False, weights=str(path), dropout=0.0),
                        num_classes=1000).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, reference(x))  # fc loaded because C == 1000


def test_weight_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match=r"model\.weights: file not found: .*nope\.pth"):
        build_model(ModelConfig(arch="resnet18", weights=str(missing)), num_classes=3)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"garbage\.pth is not a readable PyTorch checkpoint"):
        build_model(ModelConfig(arch="resnet18", weights=str(garbage)), num_classes=3)
    wrong = tmp_path / "resnet50.pth"
    torch.save(build_model(ModelConfig(arch="resnet50"), 3).backbone.state_dict(), wrong)
    with pytest.raises(ValueError, match=r"does not match the backbone of model\.arch=resnet18: .*different shape"
                                         r".*; the file fits model\.arch=resnet50$"):
        build_model(ModelConfig(arch="resnet18", weights=str(wrong)), num_classes=3)

"""Dense heads: one smp decoder per task on a shared smp encoder, outputs at input resolution."""

from __future__ import annotations

import pytest
import torch

from mtl.encoders import build_encoder
from mtl.errors import ConfigError
from mtl.heads import DenseHead
from mtl.model import MultiTaskModel
from mtl.weighting import build_weighting


@pytest.mark.parametrize("decoder, stride", [("unet", 32), ("unet", 16), ("fpn", 32), ("deeplabv3plus", 16),
                                             ("deeplabv3plus", 8)])
def test_each_decoder_predicts_at_input_resolution(decoder, stride):
    torch.manual_seed(0)
    encoder = build_encoder("smp:resnet18", output_stride=stride)
    head = DenseHead(encoder.out_channels, 13, decoder, stride, "segmentation", decoder_channels=32)
    out = head(encoder(torch.randn(2, 3, 64, 96)))
    assert out.shape == (2, 13, 64, 96)


def test_nyuv2_shaped_model_with_three_heads_and_unit_normals():
    torch.manual_seed(0)
    encoder = build_encoder("smp:resnet18", output_stride=16)
    heads = {"segmentation": DenseHead(encoder.out_channels, 13, "deeplabv3plus", 16, "segmentation", 32),
             "depth": DenseHead(encoder.out_channels, 1, "unet", 16, "depth", 32),
             "normal": DenseHead(encoder.out_channels, 3, "deeplabv3plus", 16, "normal", 32)}
    model = MultiTaskModel(encoder, heads)
    outputs, rep = model(torch.randn(2, 3, 48, 64), return_rep=True)
    assert outputs["depth"].shape == (2, 1, 48, 64)
    assert torch.allclose(outputs["normal"].norm(dim=1), torch.ones(2, 48, 64), atol=1e-5)
    # MGDA-UB on the list of feature maps: weights on the simplex, gradients reach the encoder
    losses = {t: o.float().pow(2).mean() for t, o in outputs.items()}
    weights = build_weighting("mgda_ub", list(heads)).backward(losses, rep=rep)
    assert sum(weights.values()) == pytest.approx(1.0, abs=1e-6) and min(weights.values()) >= 0
    assert all(p.grad is not None for p in model.encoder.parameters() if p.requires_grad)


@pytest.mark.parametrize("decoder, stride", [("fpn", 16), ("deeplabv3plus", 32), ("unet", 8)])
def test_decoder_on_the_wrong_output_stride_says_what_works(decoder, stride):
    with pytest.raises(ConfigError, match=rf"{decoder} decoder cannot sit on an encoder with output stride {stride}"
                                          r".*deeplabv3plus: output stride 8 or 16"):
        DenseHead([3, 64, 64, 128, 256, 512], 13, decoder, stride)


def test_unknown_decoder_and_kind():
    with pytest.raises(ConfigError, match="unknown decoder 'pspnet'"):
        DenseHead([3, 64, 64, 128, 256, 512], 13, "pspnet", 16)
    with pytest.raises(ConfigError, match="unknown dense head kind 'edges'"):
        DenseHead([3, 64, 64, 128, 256, 512], 13, "unet", 16, kind="edges")

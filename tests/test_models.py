from __future__ import annotations

import pytest
import torch
from torch import nn

from ncssl_tune.core.models import BACKBONES, SSLModel, build_backbone, build_projector, parse_projector_spec

# Smallest inputs that still exercise each backbone; a new backbone runs on 32x32 RGB by default.
INPUTS = {"small_cnn": [(1, 8), (3, 32)], "resnet18": [(1, 8), (3, 32)], "resnet50": [(3, 32)]}
CASES = [(name, c, s) for name in BACKBONES for c, s in INPUTS.get(name, [(3, 32)])]


@pytest.mark.parametrize("name, channels, size", CASES)
def test_backbone_output_dim(name, channels, size):
    torch.manual_seed(0)
    net, feat = build_backbone(name, channels, size)
    h = net(torch.rand(2, channels, size, size))
    assert h.shape == (2, feat) and net.out_dim == feat
    assert torch.isfinite(h).all()


@pytest.mark.parametrize("size, kernel, pooled", [(32, 3, False), (96, 7, True)])
def test_resnet_stem_depends_on_image_size(size, kernel, pooled):
    net, feat = build_backbone("resnet18", 1, size)
    assert net.conv1.in_channels == 1 and net.conv1.kernel_size == (kernel, kernel)
    assert isinstance(net.maxpool, nn.MaxPool2d) == pooled
    if size > 32:
        with torch.no_grad():
            assert net.eval()(torch.rand(1, 1, size, size)).shape == (1, feat)


def test_small_cnn_width_option():
    net, feat = build_backbone("small_cnn", 3, 32, {"width": 64})
    assert feat == 64 and net(torch.rand(2, 3, 32, 32)).shape == (2, 64)
    with pytest.raises(ValueError, match="multiple of 4"):
        build_backbone("small_cnn", 3, 32, {"width": 30})
    with pytest.raises(ValueError, match="unknown option.*'depth'.*allowed: width"):
        build_backbone("small_cnn", 3, 32, {"depth": 3})
    with pytest.raises(ValueError, match="allowed: none"):
        build_backbone("resnet18", 3, 32, {"width": 3})


def test_unknown_backbone_lists_choices():
    with pytest.raises(ValueError, match="choose from: small_cnn, resnet18, resnet50"):
        build_backbone("vit", 3, 32)


def test_projector_structure():
    mlp, dim = build_projector(16, "64-48-32")
    assert dim == 32 and mlp.out_dim == 32
    linears = [m for m in mlp if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(16, 64), (64, 48), (48, 32)]
    assert sum(isinstance(m, nn.BatchNorm1d) for m in mlp) == 2
    assert sum(isinstance(m, nn.ReLU) for m in mlp) == 2
    assert isinstance(mlp[-1], nn.Linear)  # the embedding is not squashed by BN or ReLU
    assert mlp(torch.rand(4, 16)).shape == (4, 32)


def test_single_layer_projector_is_one_linear():
    mlp, dim = build_projector(16, "8")
    assert dim == 8 and len(mlp) == 1 and isinstance(mlp[0], nn.Linear)


def test_empty_spec_is_identity():
    ident, dim = build_projector(16, "")
    h = torch.rand(3, 16)
    assert dim == 16 and torch.equal(ident(h), h)


@pytest.mark.parametrize("spec", ["2048-x", "0", "-", "64--32", "1.5", "-64", "64-", "64 32"])
def test_bad_projector_spec(spec):
    with pytest.raises(ValueError) as err:
        build_projector(16, spec)
    assert repr(spec) in str(err.value) and "e.g. '2048-2048-2048'" in str(err.value)


def test_parse_spec_tolerates_spaces():
    assert parse_projector_spec(" 64 - 32 ") == [64, 32]


def test_ssl_model_forward_and_backward():
    torch.manual_seed(0)
    model = SSLModel.build("small_cnn", "32-16", in_channels=1, image_size=8)
    assert (model.feat_dim, model.embed_dim) == (128, 16)
    x = torch.rand(4, 1, 8, 8)
    h, z = model(x)
    assert h.shape == (4, 128) and z.shape == (4, 16)
    z.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())
    model.eval()
    with torch.no_grad():
        assert torch.equal(model.encode(x), model(x)[0])


def test_ssl_model_identity_projector():
    f, feat = build_backbone("small_cnn", 3, 16, {"width": 32})
    g, _ = build_projector(feat, "")
    model = SSLModel(f, g)
    h, z = model(torch.rand(2, 3, 16, 16))
    assert model.embed_dim == model.feat_dim == 32 and torch.equal(h, z)


def test_ssl_model_needs_dims_for_foreign_modules():
    with pytest.raises(ValueError, match="pass feat_dim and embed_dim"):
        SSLModel(nn.Flatten(), nn.Identity())
    assert SSLModel(nn.Flatten(), nn.Identity(), feat_dim=4, embed_dim=4).embed_dim == 4

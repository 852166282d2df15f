"""Encoders (backbones) f: x -> h and projectors (expanders) g: h -> z.

Only h is used downstream (probes, kNN); the SSL loss sees z. Every built module carries `out_dim`.
"""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Callable

import torch
from torch import nn

NORMS = ("batch", "none")


def _check_norm(norm: str) -> None:
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; choose from: {', '.join(NORMS)}")


def _norm2d(norm: str, c: int) -> nn.Module:
    _check_norm(norm)
    return nn.BatchNorm2d(c) if norm == "batch" else nn.Identity()


def _norm1d(norm: str, c: int) -> nn.Module:
    _check_norm(norm)
    return nn.BatchNorm1d(c) if norm == "batch" else nn.Identity()


class SmallCNN(nn.Module):
    """Three conv-BN-ReLU layers and a global average pool: (N, C, H, W) -> (N, width).

    Fast enough on a CPU for 8x8 digits; on larger images the 2nd and 3rd layers halve the map
    while it is at least 16 px, so 32x32 ends at 8x8 and the cost stays small.
    """

    def __init__(self, in_channels: int, image_size: int, width: int = 128, norm: str = "batch"):
        super().__init__()
        if not isinstance(width, int) or width < 4 or width % 4:
            raise ValueError(f"small_cnn: width must be a positive multiple of 4, got {width!r}")
        layers: list[nn.Module] = []
        c, size = in_channels, image_size
        for i, w in enumerate((width // 4, width // 2, width)):
            stride = 2 if i > 0 and size >= 16 else 1
            # bias=False: BatchNorm right after would cancel it.
            layers += [nn.Conv2d(c, w, 3, stride, 1, bias=norm == "none"), _norm2d(norm, w), nn.ReLU(inplace=True)]
            c, size = w, (size + stride - 1) // stride
        self.features = nn.Sequential(*layers)
        self.out_dim = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, C, H, W) -> h: (N, width)."""
        return self.features(x).mean(dim=(2, 3))  # (N, width)


def _resnet(arch: str, in_channels: int, image_size: int) -> nn.Module:
    # imported here: torchvision.models pulls in torch._dynamo (~2.5 s), which every trial worker would pay at
    # start-up although the default backbone (small_cnn) never needs it
    import torchvision

    net = getattr(torchvision.models, arch)(weights=None)
    if image_size <= 64:
        # CIFAR stem (as in SimCLR/VICReg CIFAR code): a 7x7 stride-2 conv and max-pool would shrink a
        # 32x32 image to 8x8 before the first block and waste most of the network.
        net.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        net.maxpool = nn.Identity()
    elif in_channels != 3:
        net.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
    net.out_dim = net.fc.in_features  # 512 for resnet18, 2048 for resnet50
    net.fc = nn.Identity()
    return net


def resnet18(in_channels: int, image_size: int) -> nn.Module:
    """torchvision ResNet-18, random init, fc removed: (N, C, H, W) -> (N, 512).

    CIFAR stem (3x3 stride-1 conv, no max-pool) when image_size <= 64, the ImageNet stem otherwise.
    """
    return _resnet("resnet18", in_channels, image_size)


def resnet50(in_channels: int, image_size: int) -> nn.Module:
    """torchvision ResNet-50, random init, fc removed: (N, C, H, W) -> (N, 2048). Stem as resnet18."""
    return _resnet("resnet50", in_channels, image_size)


BACKBONES: dict[str, Callable[..., nn.Module]] = {
    "small_cnn": SmallCNN,
    "resnet18": resnet18,
    "resnet50": resnet50,
}


def build_backbone(name: str, in_channels: int, image_size: int,
                   options: dict | None = None) -> tuple[nn.Module, int]:
    """Build BACKBONES[name]; returns (module mapping (N, C, H, W) -> (N, F), F).

    options are extra constructor arguments (e.g. {"width": 256} for small_cnn).
    """
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose from: {', '.join(BACKBONES)}")
    for key, v in (("in_channels", in_channels), ("image_size", image_size)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}: {key} must be a positive integer, got {v!r}")
    build = BACKBONES[name]
    allowed = [p for p in inspect.signature(build).parameters if p not in ("in_channels", "image_size")]
    unknown = sorted(set(options or {}) - set(allowed))
    if unknown:
        raise ValueError(f"{name}: unknown option(s) {unknown}; allowed: {', '.join(allowed) or 'none'}")
    net = build(in_channels, image_size, **(options or {}))
    return net, net.out_dim


def parse_projector_spec(spec: str) -> list[int]:
    """'2048-2048-512' -> [2048, 2048, 512]; '' -> [] (no projector)."""
    text = str(spec).strip()
    if not text:
        return []
    parts = [p.strip() for p in text.split("-")]
    if not all(p.isdecimal() and int(p) > 0 for p in parts):
        raise ValueError(f"projector spec {spec!r} is malformed; expected positive layer widths joined by "
                         "'-', e.g. '2048-2048-2048', or '' for no projector")
    return [int(p) for p in parts]


def build_projector(in_dim: int, spec: str, norm: str = "batch") -> tuple[nn.Module, int]:
    """MLP h (N, in_dim) -> z (N, D) from spec "w1-w2-...-D"; "" gives the identity (z = h, D = in_dim).

    Hidden layers are Linear-BN-ReLU and the last layer is a plain Linear, as in the official VICReg and
    Barlow Twins code (both without bias: BN follows the hidden ones, and the losses centre z anyway).
    """
    if not isinstance(in_dim, int) or in_dim < 1:
        raise ValueError(f"projector in_dim must be a positive integer, got {in_dim!r}")
    widths = parse_projector_spec(spec)
    if not widths:
        ident = nn.Identity()
        ident.out_dim = in_dim
        return ident, in_dim
    dims = [in_dim, *widths]
    layers: list[nn.Module] = []
    for a, b in itertools.pairwise(dims[:-1]):  # hidden layers
        layers += [nn.Linear(a, b, bias=norm == "none"), _norm1d(norm, b), nn.ReLU(inplace=True)]
    layers.append(nn.Linear(dims[-2], dims[-1], bias=False))
    mlp = nn.Sequential(*layers)
    mlp.out_dim = dims[-1]
    return mlp, dims[-1]


def build_predictor(dim: int, hidden: str, norm: str = "batch") -> nn.Module:
    """The predictor q: (N, dim) -> (N, dim), hidden layers of the widths in `hidden` ("64", "512-512").

    As SimSiam's (facebookresearch/simsiam builder.py: Linear without bias, BatchNorm, ReLU, then Linear with
    bias) and BYOL's two-layer MLP; hidden Linear layers carry a bias only without BatchNorm (model.norm none),
    which would cancel it. The output keeps the embedding's width: p is compared with the other branch's z.
    """
    widths = [int(w) for w in hidden.split("-")] if hidden else []
    if not widths or any(w < 1 for w in widths):
        raise ValueError(f"predictor needs positive hidden widths joined by '-', got {hidden!r}")
    dims = [dim, *widths]
    layers: list[nn.Module] = []
    for a, b in itertools.pairwise(dims):
        layers += [nn.Linear(a, b, bias=norm == "none"), _norm1d(norm, b), nn.ReLU(inplace=True)]
    layers.append(nn.Linear(dims[-1], dim))
    q = nn.Sequential(*layers)
    q.out_dim = dim
    return q


class SSLModel(nn.Module):
    """Backbone f and projector g: x (N, C, H, W) -> (h (N, feat_dim), z (N, embed_dim)); optionally a predictor.

    feat_dim / embed_dim default to the modules' `out_dim` (set by build_backbone / build_projector).
    """

    def __init__(self, backbone: nn.Module, projector: nn.Module, feat_dim: int | None = None,
                 embed_dim: int | None = None, predictor: nn.Module | None = None):
        super().__init__()
        self.backbone, self.projector = backbone, projector
        # q on the online branch, (N, D) -> (N, D) (core/mechanisms.py): trained and checkpointed with the model,
        # applied by the trainer, never part of forward (h and z stay what the evaluators measure)
        self.predictor = predictor
        self.feat_dim = feat_dim if feat_dim is not None else getattr(backbone, "out_dim", None)
        self.embed_dim = embed_dim if embed_dim is not None else getattr(projector, "out_dim", None)
        if self.feat_dim is None or self.embed_dim is None:
            raise ValueError("SSLModel: pass feat_dim and embed_dim for modules not made by build_backbone / "
                             "build_projector (they carry no out_dim)")

    @classmethod
    def build(cls, backbone: str, projector: str, in_channels: int, image_size: int,
              backbone_options: dict | None = None) -> SSLModel:
        """Build from registry names: SSLModel.build("small_cnn", "512-512", 1, 8)."""
        f, feat = build_backbone(backbone, in_channels, image_size, backbone_options)
        g, _ = build_projector(feat, projector)
        return cls(f, g)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, C, H, W) -> h: (N, feat_dim), the representation used downstream."""
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (N, C, H, W) -> (h (N, feat_dim), z (N, embed_dim))."""
        h = self.backbone(x)  # (N, F)
        return h, self.projector(h)  # (N, D)

"""Networks of the references: the ConvNet family (DC/DSA/DM/MTT) and ResNet-18 (ImageNet and CIFAR stems).

Written here rather than taken from timm/torchvision: both pull torchvision, which does not import beside
the torch 2.13 CPU build; the ConvNet must match the references layer for layer anyway.

Names: ``convnet`` (width 128, depth 3, instance norm, ReLU, avg pooling), variants ``convnet-d4``,
``convnet-w64``, ``convnet-bn``, ``convnet-ln``, ``convnet-nn``, ``convnet-mp`` (combinable:
``convnet-d4-bn``); ``resnet18`` (BN), ``resnet18-ap`` (avg-pool downsampling, DC's ResNet18_AP),
``resnet18-in`` (instance norm); the CIFAR stem (3x3 conv, no max-pool) is used below 64 px.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from distill.errors import DistillError


def make_norm(kind: str, channels: int, spatial: int) -> nn.Module:
    if kind == "instancenorm":
        return nn.GroupNorm(channels, channels, affine=True)
    if kind == "batchnorm":
        return nn.BatchNorm2d(channels)
    if kind == "layernorm":
        return nn.LayerNorm([channels, spatial, spatial], elementwise_affine=True)
    if kind == "groupnorm":
        return nn.GroupNorm(4, channels, affine=True)
    if kind == "none":
        return nn.Identity()
    raise DistillError(f"unknown norm '{kind}'")


class Classifier(nn.Module):
    """Every network here: ``embed`` (penultimate features, ``embed_dim`` wide), then a linear ``classifier``."""

    embed_dim: int
    classifier: nn.Linear

    def embed(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))


class ConvNet(Classifier):
    """Conv3x3 -> norm -> ReLU -> 2x2 pool, ``depth`` times, then a linear head (DC's ConvNet)."""

    def __init__(
        self,
        channels: int,
        num_classes: int,
        image_size: int,
        width: int = 128,
        depth: int = 3,
        norm: str = "instancenorm",
        pooling: str = "avgpool",
        activation: str = "relu",
    ):
        super().__init__()
        layers: list[nn.Module] = []
        in_ch = channels
        # 28x28 single-channel inputs: the first conv pads by 3 so the net sees 32x32, as the reference does.
        size = 32 if image_size == 28 else image_size
        for d in range(depth):
            padding = 3 if (d == 0 and image_size == 28) else 1
            layers.append(nn.Conv2d(in_ch, width, kernel_size=3, padding=padding))
            layers.append(make_norm(norm, width, size))
            layers.append({"relu": nn.ReLU(inplace=True), "leakyrelu": nn.LeakyReLU(0.01), "sigmoid": nn.Sigmoid()}[activation])
            if pooling == "avgpool":
                layers.append(nn.AvgPool2d(2, 2))
                size //= 2
            elif pooling == "maxpool":
                layers.append(nn.MaxPool2d(2, 2))
                size //= 2
            in_ch = width
        self.features = nn.Sequential(*layers)
        self.embed_dim = width * size * size
        self.classifier = nn.Linear(self.embed_dim, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x).flatten(1)  # also an empty batch (a data-parallel process with no share)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int, norm: str, avg_down: bool):
        super().__init__()
        conv_stride = 1 if avg_down else stride
        self.conv1 = nn.Conv2d(in_planes, planes, 3, conv_stride, 1, bias=False)
        self.bn1 = _resnet_norm(norm, planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = _resnet_norm(norm, planes)
        self.pool = nn.AvgPool2d(2, 2) if (avg_down and stride != 1) else nn.Identity()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            if avg_down:
                self.shortcut = nn.Sequential(
                    nn.Conv2d(in_planes, planes, 1, 1, bias=False), nn.AvgPool2d(2, 2) if stride != 1 else nn.Identity(),
                    _resnet_norm(norm, planes),
                )
            else:
                self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), _resnet_norm(norm, planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.pool(out)
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


def _resnet_norm(norm: str, channels: int) -> nn.Module:
    if norm == "instancenorm":
        return nn.GroupNorm(channels, channels, affine=True)
    return nn.BatchNorm2d(channels)


class ResNet18(Classifier):
    """ResNet-18; ``cifar_stem`` uses a 3x3 stride-1 stem without max-pool (for 32-64 px inputs)."""

    def __init__(self, channels: int, num_classes: int, cifar_stem: bool, norm: str = "batchnorm", avg_down: bool = False):
        super().__init__()
        if cifar_stem:
            self.stem = nn.Sequential(nn.Conv2d(channels, 64, 3, 1, 1, bias=False), _resnet_norm(norm, 64), nn.ReLU(inplace=True))
        else:
            self.stem = nn.Sequential(
                nn.Conv2d(channels, 64, 7, 2, 3, bias=False), _resnet_norm(norm, 64), nn.ReLU(inplace=True),
                nn.MaxPool2d(3, 2, 1),
            )
        blocks = []
        in_planes = 64
        for planes, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
            for s in (stride, 1):
                blocks.append(BasicBlock(in_planes, planes, s, norm, avg_down))
                in_planes = planes
        self.layers = nn.Sequential(*blocks)
        self.embed_dim = 512
        self.classifier = nn.Linear(512, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(self.stem(x))
        return F.adaptive_avg_pool2d(out, 1).flatten(1)


class LeNet(Classifier):
    """LeNet-5, the network DD (Wang et al. 2018) distils MNIST for (docs/METHODS.md §1): Conv5x5(6) -> ReLU ->
    MaxPool2 -> Conv5x5(16) -> ReLU -> MaxPool2 -> FC 120 -> ReLU -> FC 84 -> ReLU -> FC classes; the first conv
    pads 28 px inputs by 2. Initialised as DD's default (``--init xavier --init_param 1``): Xavier-normal
    weights with gain 1, zero biases."""

    def __init__(self, channels: int, num_classes: int, image_size: int):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, 6, 5, padding=2 if image_size == 28 else 0), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        )
        side = ((image_size + (4 if image_size == 28 else 0) - 4) // 2 - 4) // 2
        self.fc = nn.Sequential(nn.Linear(16 * side * side, 120), nn.ReLU(inplace=True), nn.Linear(120, 84),
                                nn.ReLU(inplace=True))
        self.embed_dim = 84
        self.classifier = nn.Linear(84, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                nn.init.xavier_normal_(m.weight, gain=1.0)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).flatten(1))


def torchvision_resnet18_key(key: str) -> str:
    """torchvision ``resnet18`` state-dict key -> this module's (ImageNet stem, batch norm, no avg-down)."""
    if key.startswith("conv1."):
        return "stem.0." + key[len("conv1."):]
    if key.startswith("bn1."):
        return "stem.1." + key[len("bn1."):]
    if key.startswith("fc."):
        return "classifier." + key[len("fc."):]
    if m := re.fullmatch(r"layer([1-4])\.([01])\.(.+)", key):
        rest = m.group(3).replace("downsample.", "shortcut.")
        return f"layers.{2 * (int(m.group(1)) - 1) + int(m.group(2))}.{rest}"
    return key


def load_torchvision_resnet18(path, channels: int, num_classes: int) -> ResNet18:
    """A ResNet-18 from a local torchvision-format checkpoint (``torch.save(model.state_dict())`` or safetensors),
    e.g. the ImageNet teacher DDOQ and RDED use; the operator provides the file (nothing is downloaded)."""
    from pathlib import Path

    path = Path(path)
    if not path.is_file():
        raise DistillError(f"teacher checkpoint {path} does not exist")
    state: Any
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
            state = state.get("state_dict", state) if isinstance(state, dict) else state
    except Exception as exc:  # noqa: BLE001 - torch/safetensors raise many types for a bad file
        raise DistillError(f"teacher checkpoint {path}: unreadable ({type(exc).__name__}: {exc})") from exc
    if not isinstance(state, dict):
        raise DistillError(f"teacher checkpoint {path}: not a state dict")
    model = ResNet18(channels, num_classes, cifar_stem=False)
    mapped = {torchvision_resnet18_key(k.removeprefix("module.")): v for k, v in state.items()}
    try:
        model.load_state_dict(mapped)
    except RuntimeError as exc:
        raise DistillError(f"teacher checkpoint {path}: not a torchvision ResNet-18 for {channels} channels and "
                           f"{num_classes} classes ({str(exc).splitlines()[0]})") from exc
    return model


NORM_TOKENS = {"bn": "batchnorm", "in": "instancenorm", "ln": "layernorm", "gn": "groupnorm", "nn": "none"}
NETWORK_NAMES = ["convnet", "convnet-d4", "convnet-bn", "convnet-w64", "resnet18", "resnet18-ap", "resnet18-in", "lenet"]


def build_network(name: str, channels: int, num_classes: int, image_size: int, seed: int | None = None) -> Classifier:
    """Build a network by name; with ``seed`` the initialisation is deterministic."""
    if seed is not None:
        torch.manual_seed(seed)
    name = name.lower()
    if name.startswith("convnet"):
        kwargs: dict = {}
        for token in name.split("-")[1:]:
            if m := re.fullmatch(r"d(\d+)", token):
                kwargs["depth"] = int(m.group(1))
            elif m := re.fullmatch(r"w(\d+)", token):
                kwargs["width"] = int(m.group(1))
            elif token in ("bn", "in", "ln", "gn", "nn"):
                kwargs["norm"] = NORM_TOKENS[token]
            elif token in ("ap", "mp", "np"):
                kwargs["pooling"] = {"ap": "avgpool", "mp": "maxpool", "np": "none"}[token]
            else:
                raise DistillError(f"unknown network '{name}' (variant token '{token}')")
        return ConvNet(channels, num_classes, image_size, **kwargs)
    if name == "lenet":
        return LeNet(channels, num_classes, image_size)
    if name in ("resnet18", "resnet18-bn", "resnet18-ap", "resnet18-in"):
        return ResNet18(
            channels, num_classes, cifar_stem=image_size < 64,
            norm="instancenorm" if name.endswith("-in") else "batchnorm", avg_down=name.endswith("-ap"),
        )
    raise DistillError(f"unknown network '{name}'; known: {', '.join(NETWORK_NAMES)} (convnet-dN-wN-bn|ln|nn-mp)")


def default_network(image_size: int) -> str:
    """ConvNet depth by resolution, as the references do (D3 at 32, D4 at 64, D5 at 128+)."""
    if image_size <= 32:
        return "convnet"
    if image_size <= 64:
        return "convnet-d4"
    return "convnet-d5"

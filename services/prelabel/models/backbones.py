"""The torchvision backbones Prelabel serves and fine-tunes, split into body and head.

Every architecture becomes a :class:`Classifier` whose ``body`` maps images to an embedding (the
penultimate features) and whose ``head`` is the last linear layer. Predict returns both, and
transfer learning replaces or retrains the head, so the split is defined once, here.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torchvision.models as tvm
from torch import nn

from prelabel.errors import InvalidArgument, NotFound, Unavailable
from prelabel.preprocessing import Preprocess


@dataclass(frozen=True)
class Architecture:
    """One torchvision architecture: its builder, ImageNet weights and where its head sits."""

    name: str
    family: str  # resnet | mobilenet | efficientnet | vit
    builder: Callable[..., nn.Module]
    weights: Any  # a torchvision WeightsEnum member

    def imagenet_preprocess(self) -> Preprocess:
        t = self.weights.transforms()
        return Preprocess(
            resize=int(t.resize_size[0]),
            crop=int(t.crop_size[0]),
            mean=tuple(t.mean),
            std=tuple(t.std),
            interpolation=str(t.interpolation.value),
        )


ARCHITECTURES: dict[str, Architecture] = {
    a.name: a
    for a in (
        Architecture("resnet18", "resnet", tvm.resnet18, tvm.ResNet18_Weights.IMAGENET1K_V1),
        Architecture("resnet50", "resnet", tvm.resnet50, tvm.ResNet50_Weights.IMAGENET1K_V2),
        Architecture(
            "mobilenet_v3_small", "mobilenet", tvm.mobilenet_v3_small, tvm.MobileNet_V3_Small_Weights.IMAGENET1K_V1
        ),
        Architecture(
            "mobilenet_v3_large", "mobilenet", tvm.mobilenet_v3_large, tvm.MobileNet_V3_Large_Weights.IMAGENET1K_V2
        ),
        Architecture("efficientnet_b0", "efficientnet", tvm.efficientnet_b0, tvm.EfficientNet_B0_Weights.IMAGENET1K_V1),
        Architecture("vit_b_16", "vit", tvm.vit_b_16, tvm.ViT_B_16_Weights.IMAGENET1K_V1),
    )
}


def architecture(name: str) -> Architecture:
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise InvalidArgument(
            f"unknown architecture {name!r}; choose one of: {', '.join(sorted(ARCHITECTURES))}"
        ) from None


POOLINGS = ("last", "stages", "texture")
HISTOGRAM_RANGE = 2.5  # normalised inputs are binned over [-2.5, 2.5]: any mean/std normalisation maps pixels there
COLOUR_BINS, GREY_BINS = 8, 16
SPREAD_STAGES = 2  # the first stages' spreads are texture; later stages' are class-specific
INPUT_STATISTICS = 6 + 3 * COLOUR_BINS + GREY_BINS  # channel means and spreads, then the histograms


class Classifier(nn.Module):
    """A backbone whose forward pass returns ``(logits, embedding)``.

    ``pooling`` says what the embedding is (ResNets for all but ``last``); each is a suffix of the next:

    - ``last``: the body's own output (the penultimate features);
    - ``stages``: the global average of every stage's output, concatenated (the last stage's is ``last``);
    - ``texture``: the input's statistics (per-channel mean and spread, an 8-bin histogram per channel
      and a 16-bin grey-level histogram of the normalised input), the spread of the first two stages'
      outputs, then ``stages``.

    The early stages' statistics (edges, colours, textures) transfer to images unlike the pre-training
    data where the last stage's class-specific features do not, and colour and texture statistics are
    what a base pre-trained on generated images knows least: on the tuning tasks of
    ``bench/label_efficiency.py`` a linear head on ``texture`` is 4-10 points more accurate on photos
    than on ``stages`` (docs/training.md).
    """

    def __init__(self, body: nn.Module, head: nn.Linear, pooling: str = "last") -> None:
        super().__init__()
        self.body = body
        self.head = head
        self.pooling = _checked(pooling)

    @property
    def embedding_dim(self) -> int:
        return int(self.head.in_features)

    @property
    def statistics_dim(self) -> int:
        """How many leading columns of the embedding are the input's own statistics (``texture``), not the body's."""
        return INPUT_STATISTICS if self.pooling == "texture" else 0

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        if self.pooling == "last":
            return self.body(images)  # type: ignore[no-any-return]
        body: Any = self.body
        x = body.maxpool(body.relu(body.bn1(body.conv1(images))))
        means, spreads = [], []
        for i, layer in enumerate((body.layer1, body.layer2, body.layer3, body.layer4)):
            x = layer(x)
            means.append(x.mean((2, 3)))
            if self.pooling == "texture" and i < SPREAD_STAGES:
                spreads.append(x.std((2, 3)))
        if self.pooling == "stages":
            return torch.cat(means, 1)
        return torch.cat([input_statistics(images), *spreads, *means], 1)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embedding = self.embed(images)
        return self.head(embedding), embedding


def input_statistics(images: torch.Tensor) -> torch.Tensor:
    """Per-channel mean and spread and colour and grey-level histograms of normalised ``[N, 3, H, W]`` images."""

    def histogram(values: torch.Tensor, bins: int) -> torch.Tensor:  # over the last two dimensions
        scaled = (values + HISTOGRAM_RANGE) * (bins / (2 * HISTOGRAM_RANGE))
        index = scaled.floor().clamp(0, bins - 1)
        return torch.stack([(index == b).float().mean((-2, -1)) for b in range(bins)], -1).flatten(1)

    return torch.cat([images.mean((2, 3)), images.std((2, 3)), histogram(images, COLOUR_BINS),
                      histogram(images.mean(1), GREY_BINS)], 1)  # fmt: skip


def _checked(pooling: str) -> str:
    if pooling not in POOLINGS:
        raise InvalidArgument(f"unknown pooling {pooling!r}; choose one of: {', '.join(POOLINGS)}")
    return pooling


def _stage_widths(body: nn.Module) -> list[int]:
    widths = []
    for layer in (getattr(body, f"layer{i}") for i in range(1, 5)):
        norms = [m for m in layer.modules() if isinstance(m, nn.BatchNorm2d)]
        widths.append(norms[-1].num_features)
    return widths


def embedding_width(body: nn.Module, pooling: str) -> int:
    """The width of a ResNet's ``stages`` or ``texture`` embedding."""
    widths = _stage_widths(body)
    if pooling == "stages":
        return sum(widths)
    return INPUT_STATISTICS + sum(widths[:SPREAD_STAGES]) + sum(widths)


def pooled_by_stage(model: Classifier, family: str, classes: int, pooling: str = "texture") -> Classifier | None:
    """A classifier sharing ``model``'s body that reads every stage (a new, untrained head); None if not a ResNet."""
    if family != "resnet":
        return None
    return Classifier(model.body, nn.Linear(embedding_width(model.body, pooling), classes), pooling=pooling)


def _split(model: Any, family: str) -> Classifier:
    """Detach the last linear layer of a torchvision model, leaving an identity in its place."""
    if family == "resnet":
        head, model.fc = model.fc, nn.Identity()
    elif family == "vit":
        head, model.heads.head = model.heads.head, nn.Identity()
    else:  # mobilenet, efficientnet: a Sequential classifier ending in the Linear
        head, model.classifier[-1] = model.classifier[-1], nn.Identity()
    assert isinstance(head, nn.Linear)
    return Classifier(model, head)


def _builder_kwargs(arch: Architecture, image_size: int | None) -> dict[str, Any]:
    # ViT's position embeddings are sized for one input resolution.
    return {"image_size": image_size} if arch.family == "vit" and image_size else {}


def build(arch_name: str, num_classes: int, image_size: int | None = None, pooling: str = "last") -> Classifier:
    """A randomly initialised classifier with ``num_classes`` outputs."""
    arch = architecture(arch_name)
    model = arch.builder(weights=None, num_classes=num_classes, **_builder_kwargs(arch, image_size))
    classifier = _split(model, arch.family)
    if _checked(pooling) == "last":
        return classifier
    pooled = pooled_by_stage(classifier, arch.family, num_classes, pooling)
    if pooled is None:
        raise InvalidArgument(f"pooling {pooling!r} needs a ResNet; {arch_name} is a {arch.family}")
    return pooled


def imagenet(arch_name: str) -> tuple[Classifier, list[str], Preprocess]:
    """The ImageNet classifier from torchvision's weights: downloaded once, then read from the cache.

    The cache is torch.hub's (``$TORCH_HOME/hub/checkpoints``), so an offline machine works once the
    file has been copied there.
    """
    arch = architecture(arch_name)
    try:
        model = arch.builder(weights=arch.weights)
    except (OSError, RuntimeError) as exc:  # URLError is an OSError
        cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(arch.weights.url).name
        raise Unavailable(
            f"cannot load ImageNet weights for {arch_name}: {exc}. Without a network, copy "
            f"{arch.weights.url} to {cache}, or pass a local weights file instead."
        ) from exc
    return _split(model, arch.family), list(arch.weights.meta["categories"]), arch.imagenet_preprocess()


def save_state(state: dict[str, torch.Tensor], path: Path) -> None:
    """Save weights for :func:`load_state`. Serialised in memory first: ``torch.save`` into a file on a
    full disk fails as a RuntimeError ("unexpected pos") that does not say the disk is full."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    path.write_bytes(buffer.getvalue())


def load_state(model: Classifier, path: Path) -> None:
    """Load weights saved by Prelabel (``body.``/``head.`` keys) or a plain torchvision state dict."""
    if not path.is_file():
        raise NotFound(f"weights file {path} does not exist")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not any(k.startswith(("body.", "head.")) for k in state):
        state = _torchvision_to_classifier(model, state)
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise InvalidArgument(f"weights file {path} does not fit this architecture: {exc}") from exc


def _torchvision_to_classifier(model: Classifier, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    head_keys = {"weight", "bias"}
    head_prefix = next(
        (p for p in ("fc.", "heads.head.") if any(k.startswith(p) for k in state)), None
    ) or _last_linear_prefix(state)
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith(head_prefix) and key[len(head_prefix) :] in head_keys:
            out["head." + key[len(head_prefix) :]] = value
        else:
            out["body." + key] = value
    return out


def _last_linear_prefix(state: dict[str, torch.Tensor]) -> str:
    weights = [k for k in state if k.startswith("classifier.") and k.endswith(".weight")]
    return weights[-1][: -len("weight")] if weights else "classifier."


class Normalizer:
    """uint8 ``[N, H, W, 3]`` pixels to the normalised float ``[N, 3, H, W]`` input a set of weights expects."""

    def __init__(self, preprocess: Preprocess, device: torch.device) -> None:
        self.device = device
        self.mean = torch.tensor(preprocess.mean, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(preprocess.std, device=device).view(1, 3, 1, 1) * 255

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float()
        x = (x - self.mean) / self.std
        return x.contiguous(memory_format=torch.channels_last) if self.device.type == "cuda" else x

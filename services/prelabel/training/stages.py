"""What a "stage" is in each architecture family, for freezing the first k of them.

ResNet: the stem then layer1..layer4. MobileNet and EfficientNet: the blocks of ``features``.
ViT: the patch embedding (with the class token and position embeddings), then each encoder layer.
Frozen stages keep their BatchNorm statistics: :func:`keep_frozen_in_eval` after every ``train()``.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from prelabel.models.backbones import Classifier


class _Params(nn.Module):
    """Parameters that belong to no submodule (ViT's class token and position embedding)."""

    def __init__(self, *params: nn.Parameter) -> None:
        super().__init__()
        self.params = nn.ParameterList(params)


def stages(model: Classifier, family: str) -> list[nn.Module]:
    body: Any = model.body
    if family == "resnet":
        return [nn.ModuleList([body.conv1, body.bn1]), body.layer1, body.layer2, body.layer3, body.layer4]
    if family in ("mobilenet", "efficientnet"):
        return list(body.features.children())
    if family == "vit":
        stem = nn.ModuleList([body.conv_proj, _Params(body.class_token, body.encoder.pos_embedding)])
        return [stem, *body.encoder.layers.children()]
    raise ValueError(f"no stage definition for family {family!r}")


def freeze_first(model: Classifier, family: str, k: int) -> list[nn.Module]:
    """Freeze the first ``k`` stages; returns them, to be kept in eval mode during training."""
    all_stages = stages(model, family)
    if not 0 <= k <= len(all_stages):
        raise ValueError(f"freeze_first_k={k}: this architecture has {len(all_stages)} stages")
    for stage in all_stages[:k]:
        for p in stage.parameters():
            p.requires_grad_(False)
    return all_stages[:k]


def keep_frozen_in_eval(frozen: list[nn.Module]) -> None:
    for stage in frozen:
        stage.eval()

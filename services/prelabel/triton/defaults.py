"""Puts the default model into the model repository on first start.

``base_weights`` chooses it: ``builtin`` (the project's own pre-trained model, shipped in the
package, no download), ``ARCH:imagenet`` (torchvision's ImageNet weights, downloaded once and
cached) or ``ARCH:/path/to/weights.pth`` (a local file).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from prelabel.errors import InvalidArgument
from prelabel.models import backbones, base
from prelabel.models.card import VersionCard
from prelabel.preprocessing import Preprocess
from prelabel.triton.repository import ModelRepository

log = logging.getLogger("prelabel.models")

IMAGENET_HINT = (
    "for ImageNet weights set PRELABEL_BASE_WEIGHTS=resnet50:imagenet (or another of "
    + ", ".join(sorted(backbones.ARCHITECTURES))
    + ") and PRELABEL_DEFAULT_MODEL=resnet50 where a network exists, or ARCH:/path/to/weights.pth"
)


def ensure_default_model(repository: ModelRepository, name: str, spec: str) -> None:
    if repository.versions(name):
        log.info("default model %r is in the repository (versions %s)", name, repository.versions(name))
        return
    if spec == "builtin":
        _install_builtin(repository, name)
        log.info(
            "serving Prelabel's built-in base model %r (%s pre-trained on generated images, %d classes of "
            "Prelabel Formulas: fine-tune it on your labels); %s",
            name,
            base.ARCH,
            len(base.files().read_card()["labels"]),
            IMAGENET_HINT,
        )
        return
    arch, _, weights = spec.partition(":")
    if not weights:
        raise InvalidArgument(f"PRELABEL_BASE_WEIGHTS={spec!r}: expected builtin, ARCH:imagenet or ARCH:/path/to/file")
    if weights == "imagenet":
        model, labels, preprocess = backbones.imagenet(arch)
    else:
        model, labels, preprocess = _from_file(arch, Path(weights).expanduser())
    card = VersionCard(arch=arch, labels=labels, preprocess=preprocess, base_model=spec)
    version = repository.add_version(name, card, lambda d: backbones.save_state(model.state_dict(), d / "weights.pt"))
    log.info("installed default model %r version %d from %s", name, version, spec)


def _install_builtin(repository: ModelRepository, name: str) -> None:
    files = base.files()
    card_data = files.read_card()
    card = VersionCard(
        arch=card_data["arch"],
        labels=list(card_data["labels"]),
        preprocess=files.preprocess,
        base_model=f"{card_data['arch']} pre-trained on Prelabel Formulas",
        metrics={"pretraining_heldout_accuracy": float(card_data["pretraining"]["heldout_accuracy"])},
    )

    def write(folder: Path) -> None:
        shutil.copy2(files.weights, folder / "weights.pt")
        shutil.copy2(files.reference, folder / "reference.npz")

    repository.add_version(name, card, write)


def _from_file(arch: str, path: Path) -> tuple[backbones.Classifier, list[str], Preprocess]:
    """A local torchvision-format (ImageNet, 1000 classes) or Prelabel-format weights file."""
    a = backbones.architecture(arch)
    model = backbones.build(arch, num_classes=len(a.weights.meta["categories"]))
    backbones.load_state(model, path)
    return model, list(a.weights.meta["categories"]), a.imagenet_preprocess()

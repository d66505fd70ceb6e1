"""The transfer-learning engine: four ways to adapt a pre-trained model, and a measured choice.

| strategy             | backbone                         | trained                      |
|----------------------|----------------------------------|------------------------------|
| feature extraction   | frozen; embeddings cached once   | a new linear head only       |
| freeze first k       | first k stages frozen            | the other stages and a head  |
| full fine-tune       | every layer, pre-trained start   | all, backbone at a lower LR  |
| from scratch         | same architecture, random init   | all                          |

``STRATEGY_AUTO`` follows the four cases of transfer learning (data size x similarity to the
pre-training data), measuring similarity on the base model's embeddings, and confirms its choice
against feature extraction (which costs seconds, its embeddings being computed anyway) on the
validation split. Usable as a library: :func:`train` takes examples and a callback, and returns a
model with its metrics, calibration and the reasons for its strategy.
"""

from __future__ import annotations

import copy
import io
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import nn

from prelabel.errors import InvalidArgument
from prelabel.files import write_atomically
from prelabel.models import backbones
from prelabel.models.base import reference_statistics
from prelabel.preprocessing import Preprocess
from prelabel.training import calibration, data, stages
from prelabel.training.similarity import similarity as measure_similarity
from prelabel.triton.repository import ModelRepository

AUTO = "STRATEGY_AUTO"
FEATURE_EXTRACTION = "STRATEGY_FEATURE_EXTRACTION"
FREEZE_FIRST_K = "STRATEGY_FREEZE_FIRST_K"
FULL_FINE_TUNE = "STRATEGY_FULL_FINE_TUNE"
FROM_SCRATCH = "STRATEGY_FROM_SCRATCH"
STRATEGIES = (AUTO, FEATURE_EXTRACTION, FREEZE_FIRST_K, FULL_FINE_TUNE, FROM_SCRATCH)
NAMES = {
    FEATURE_EXTRACTION: "feature extraction",
    FREEZE_FIRST_K: "freeze the first k stages",
    FULL_FINE_TUNE: "full fine-tuning",
    FROM_SCRATCH: "training from scratch",
}

# The four cases' boundaries. Similarity is the normalised Fréchet measure of training/similarity.py:
# on Prelabel's base model, images like its pre-training data score ~0.99, new shapes ~0.6 and
# handwritten digits ~0.45. Other backbones may need other values.
# Measured with bench/label_efficiency.py on the built-in base model: from 25 labels per class,
# full fine-tuning matches or beats feature extraction on similar data, and training from scratch
# beats every use of the pre-trained weights on dissimilar data (digits: 91% vs 60% at 25/class).
SMALL_PER_CLASS = 20
HIGH_SIMILARITY = 0.5

# (epochs, head learning rate, backbone learning rate as a fraction of the head's)
DEFAULTS = {
    FREEZE_FIRST_K: (20, 3e-3, 0.3),
    FULL_FINE_TUNE: (20, 3e-3, 0.1),
    FROM_SCRATCH: (30, 3e-3, 1.0),
}


@dataclass
class Base:
    """The model to start from: a version in the repository, with its reference statistics."""

    name: str
    version: int
    arch: str
    model: backbones.Classifier
    preprocess: Preprocess
    reference: dict[str, npt.NDArray[Any]] | None

    @property
    def family(self) -> str:
        return backbones.architecture(self.arch).family


def load_base(repository: ModelRepository, name: str, version: int | None = None) -> Base:
    versions = repository.versions(name)
    if not versions:
        raise InvalidArgument(f"base model {name!r} is not in the repository; models: {repository.models() or 'none'}")
    number = version or max(versions)
    card = repository.card(name, number)
    folder = repository.version_dir(name, number)
    model = backbones.build(card.arch, len(card.labels), image_size=card.preprocess.crop)
    backbones.load_state(model, folder / "weights.pt")
    reference = dict(np.load(folder / "reference.npz")) if (folder / "reference.npz").is_file() else None
    return Base(name, number, card.arch, model, card.preprocess, reference)


@dataclass
class TrainConfig:
    strategy: str = AUTO
    freeze_first_k: int = 0  # 0: half of the stages
    epochs: int = 0  # 0: the strategy's default
    learning_rate: float = 0.0  # the head's; 0: the strategy's default
    batch_size: int = 64
    seed: int = 0
    val_fraction: float = 0.2
    patience: int = 5  # epochs without a better validation accuracy before stopping
    target_precision: float = 0.95
    device: str = "auto"
    trial: bool = True  # AUTO: confirm against feature extraction on the validation split


@dataclass
class Progress:
    stage: str
    epoch: int
    epochs: int
    loss: float
    accuracy: float  # on the validation split
    fraction: float  # of the whole run
    eta_s: float

    @property
    def message(self) -> str:
        return (f"{self.stage}: epoch {self.epoch}/{self.epochs}, loss {self.loss:.3f}, "
                f"validation accuracy {self.accuracy:.1%}, about {self.eta_s:.0f}s left")  # fmt: skip


ProgressCallback = Callable[[Progress], None]


class Stopped(Exception):
    """Training stopped because ``should_stop`` said so (the job was cancelled, or the worker is leaving)."""


@dataclass
class Checkpoint:
    """The training loop's state, saved after every epoch so that a killed run resumes where it was.

    Saved to a temporary file and renamed, so a kill mid-save leaves the previous checkpoint whole.
    """

    path: Path

    def load(self) -> dict[str, Any] | None:
        if not self.path.is_file():
            return None
        state: dict[str, Any] = torch.load(self.path, map_location="cpu", weights_only=False)
        return state

    def save(self, state: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        torch.save(state, buffer)
        write_atomically(self.path, buffer.getvalue())


@dataclass
class Decision:
    requested: str
    chosen: str
    reason: str
    examples: int
    per_class: float
    similarity: float | None
    freeze_first_k: int = 0
    trial: dict[str, float] = field(default_factory=dict)


@dataclass
class TrainResult:
    model: backbones.Classifier
    arch: str
    classes: list[str]
    preprocess: Preprocess
    decision: Decision
    metrics: dict[str, float]
    temperature: float
    threshold: float | None
    reference: dict[str, npt.NDArray[Any]]


def decide(
    requested: str, examples: int, classes: int, similarity: float | None, n_stages: int, freeze_first_k: int
) -> Decision:
    per_class = examples / classes
    k = freeze_first_k or n_stages // 2
    if requested != AUTO:
        return Decision(requested, requested, f"{NAMES[requested]}, as requested", examples, per_class, similarity, k)
    small = per_class < SMALL_PER_CLASS
    high = similarity is None or similarity >= HIGH_SIMILARITY
    if small and high:
        chosen, why = FEATURE_EXTRACTION, "few examples of similar images: a new head on the frozen backbone"
    elif small:
        chosen, why = FREEZE_FIRST_K, f"few examples of different images: keep the first {k} stages' generic features"
    elif high:
        chosen, why = FULL_FINE_TUNE, "many examples of similar images: adapt every layer from the pre-trained start"
    else:
        chosen, why = FROM_SCRATCH, "many examples of different images: learn features for them from scratch"
    measured = "no reference statistics (assumed similar)" if similarity is None else f"similarity {similarity:.2f}"
    reason = f"{examples} examples, {per_class:.0f} per class, {measured}: {NAMES[chosen]} ({why})"
    return Decision(requested, chosen, reason, examples, per_class, similarity, k)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@torch.no_grad()  # not inference_mode: feature extraction trains a head on these embeddings
def _forward(model: backbones.Classifier, pixels: torch.Tensor, normalize: backbones.Normalizer, batch: int = 256
             ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    model.eval()
    logits, embeddings = [], []
    for i in range(0, len(pixels), batch):
        with torch.autocast("cuda", dtype=torch.float16, enabled=normalize.device.type == "cuda"):
            out, emb = model(normalize(pixels[i : i + batch]))
        logits.append(out.float().cpu())
        embeddings.append(emb.float().cpu())
    return torch.cat(logits), torch.cat(embeddings)


def _augment(x: torch.Tensor, generator: torch.Generator, pad: int) -> torch.Tensor:
    """Random translations of up to ``pad`` pixels (reflect padding, then a random crop per image)."""
    if pad == 0:
        return x
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    offsets = torch.randint(0, 2 * pad + 1, (len(x), 2), generator=generator).tolist()
    h, w = x.shape[-2:]
    return torch.stack([padded[i, :, dy : dy + h, dx : dx + w] for i, (dy, dx) in enumerate(offsets)])


def _fit_head(
    train_emb: torch.Tensor, train_y: torch.Tensor, val_emb: torch.Tensor, val_y: torch.Tensor, classes: int,
    seed: int, lr: float, steps: int = 300,
) -> nn.Linear:  # fmt: skip
    """A linear head on cached embeddings, trained full-batch on standardised features, then folded back."""
    torch.manual_seed(seed)
    mean, std = train_emb.mean(0), train_emb.std(0).clamp_min(1e-6)
    head = nn.Linear(train_emb.shape[1], classes)
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=1e-3)
    xs, xv = (train_emb - mean) / std, (val_emb - mean) / std
    best = (-1.0, math.inf, copy.deepcopy(head.state_dict()))
    for _ in range(steps):
        optimizer.zero_grad()
        torch.autograd.backward(F.cross_entropy(head(xs), train_y))
        optimizer.step()
        with torch.no_grad():
            logits = head(xv)
            acc, loss = float((logits.argmax(1) == val_y).float().mean()), float(F.cross_entropy(logits, val_y))
        if (acc, -loss) > (best[0], -best[1]):
            best = (acc, loss, copy.deepcopy(head.state_dict()))
    head.load_state_dict(best[2])
    folded = nn.Linear(train_emb.shape[1], classes)
    with torch.no_grad():  # W (x - m) / s + b  ==  (W / s) x + (b - W m / s)
        folded.weight.copy_(head.weight / std)
        folded.bias.copy_(head.bias - (head.weight / std) @ mean)
    return folded


def _fit(
    model: backbones.Classifier,
    frozen: list[nn.Module],
    train_set: data.Examples,
    val_set: data.Examples,
    normalize: backbones.Normalizer,
    config: TrainConfig,
    strategy: str,
    report: Callable[[int, int, float, float], None],
    checkpoint: Checkpoint | None = None,
    should_stop: Callable[[], bool] = lambda: False,
) -> tuple[int, float, int]:
    """Mini-batch training with early stopping on validation accuracy; leaves the best weights in ``model``.

    Returns (epochs run, best validation accuracy, the epoch a checkpoint resumed from or 0).
    """
    epochs, lr, body_ratio = DEFAULTS[strategy]
    epochs, lr = config.epochs or epochs, config.learning_rate or lr
    # From random weights the first epochs are at chance while the one-cycle schedule warms up.
    patience = max(config.patience, epochs // 2) if strategy == FROM_SCRATCH else config.patience
    device = normalize.device
    model.to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    head_params = list(model.head.parameters())
    body_params = [p for p in model.body.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [{"params": body_params, "lr": lr * body_ratio}, {"params": head_params, "lr": lr}], weight_decay=0.05
    )
    steps_per_epoch = math.ceil(len(train_set) / config.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=[lr * body_ratio, lr], total_steps=epochs * steps_per_epoch, pct_start=0.15
    )
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda")
    generator = torch.Generator().manual_seed(config.seed)
    pad = max(2, train_set.pixels.shape[1] // 16)
    best_acc, best_state, stale, ran = -1.0, copy.deepcopy(model.state_dict()), 0, 0
    saved = checkpoint.load() if checkpoint else None
    resumed = 0
    if saved is not None and saved["strategy"] == strategy and saved["epochs"] == epochs:
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        schedule.load_state_dict(saved["schedule"])
        scaler.load_state_dict(saved["scaler"])
        generator.set_state(saved["generator"])
        torch.set_rng_state(saved["torch_rng"])
        best_acc, best_state, stale, resumed = saved["best_acc"], saved["best_state"], saved["stale"], saved["epoch"]
        ran = resumed
    for epoch in range(resumed + 1, epochs + 1):
        if stale >= patience:
            break
        model.train()
        stages.keep_frozen_in_eval(frozen)
        order = torch.randperm(len(train_set), generator=generator)
        total = 0.0
        for i in range(0, len(order), config.batch_size):
            if should_stop():
                raise Stopped(f"stopped at epoch {epoch} of {epochs}")
            index = order[i : i + config.batch_size]
            x = _augment(normalize(train_set.pixels[index]), generator, pad)
            y = train_set.labels[index].to(device)
            with torch.autocast("cuda", dtype=torch.float16, enabled=device.type == "cuda"):
                loss = F.cross_entropy(model(x)[0], y)
            optimizer.zero_grad(set_to_none=True)
            torch.autograd.backward(scaler.scale(loss))
            scaler.step(optimizer)
            scaler.update()
            schedule.step()
            total += float(loss.detach()) * len(index)
        logits, _ = _forward(model, val_set.pixels, normalize)
        acc = float((logits.argmax(1) == val_set.labels).float().mean())
        ran = epoch
        report(epoch, epochs, total / len(train_set), acc)
        if acc > best_acc:
            best_acc, best_state, stale = acc, copy.deepcopy(model.state_dict()), 0
        else:
            stale += 1
        if checkpoint:
            checkpoint.save({
                "strategy": strategy, "epochs": epochs, "epoch": epoch, "model": model.state_dict(),
                "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(), "scaler": scaler.state_dict(),
                "generator": generator.get_state(), "torch_rng": torch.get_rng_state(),
                "best_acc": best_acc, "best_state": best_state, "stale": stale,
            })  # fmt: skip
    model.load_state_dict(best_state)
    return ran, best_acc, resumed


def _strategy_model(base: Base, strategy: str, classes: int, k: int) -> tuple[backbones.Classifier, list[nn.Module]]:
    if strategy == FROM_SCRATCH:
        model = backbones.build(base.arch, classes, image_size=base.preprocess.crop)
        # torchvision's MobileNets and EfficientNets use BatchNorm momentum 0.01, tuned for long
        # ImageNet runs: from random weights and a few hundred steps, the running statistics would
        # lag far behind and evaluation would be at chance. 0.1 tracks them.
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.momentum = 0.1
        return model, []
    model = copy.deepcopy(base.model)
    model.head = nn.Linear(model.embedding_dim, classes)
    if strategy == FREEZE_FIRST_K:
        return model, stages.freeze_first(model, base.family, k)
    return model, []


def train(
    base: Base,
    examples: data.Examples,
    config: TrainConfig | None = None,
    progress: ProgressCallback | None = None,
    checkpoint: Checkpoint | None = None,
    should_stop: Callable[[], bool] = lambda: False,
) -> TrainResult:
    """Adapt ``base`` to ``examples``; deterministic for a given seed on a given device and thread count.

    With a ``checkpoint``, a run that was killed resumes from its last epoch; ``should_stop`` is
    asked before every batch and raises :class:`Stopped` when it answers True.
    """
    config = config or TrainConfig()
    if config.strategy not in STRATEGIES:
        raise InvalidArgument(f"unknown strategy {config.strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if not 0 < config.target_precision < 1:
        raise InvalidArgument(f"target_precision={config.target_precision} must be between 0 and 1")
    data.check(examples)
    started = time.monotonic()
    torch.manual_seed(config.seed)
    device = _device(config.device)
    normalize = backbones.Normalizer(base.preprocess, device)
    train_set, val_set = data.split(examples, config.val_fraction, config.seed)
    n_classes = len(examples.classes)
    notify = progress or (lambda p: None)

    # The base's embeddings serve twice: to measure similarity and as feature extraction's cache.
    base.model.to(device)
    _, train_emb = _forward(base.model, train_set.pixels, normalize)
    _, val_emb = _forward(base.model, val_set.pixels, normalize)
    similarity = measure_similarity(train_emb.numpy(), base.reference) if base.reference is not None else None
    n_stages = len(stages.stages(base.model, base.family))
    decision = decide(config.strategy, len(examples), n_classes, similarity, n_stages, config.freeze_first_k)
    if decision.chosen == FREEZE_FIRST_K and not 0 < decision.freeze_first_k <= n_stages:
        raise InvalidArgument(f"freeze_first_k={decision.freeze_first_k}: {base.arch} has {n_stages} stages")

    def report(stage: str) -> Callable[[int, int, float, float], None]:
        def call(epoch: int, epochs: int, loss: float, acc: float) -> None:
            elapsed = time.monotonic() - started
            fraction = epoch / epochs
            notify(Progress(stage, epoch, epochs, loss, acc, fraction, elapsed / fraction * (1 - fraction)))

        return call

    # strategy -> (model, epochs run, validation logits); feature extraction reuses the cached
    # embeddings everywhere, since its backbone is the base's: no further pass over the images.
    candidates: dict[str, tuple[backbones.Classifier, int, torch.Tensor]] = {}
    resumed_from = 0
    if decision.chosen == FEATURE_EXTRACTION or (config.strategy == AUTO and config.trial):
        head = _fit_head(train_emb, train_set.labels, val_emb, val_set.labels, n_classes, config.seed,
                         config.learning_rate or 1e-2)  # fmt: skip
        with torch.no_grad():
            fe_logits = head(val_emb)
        fe = copy.deepcopy(base.model)
        fe.head = head.to(device)
        candidates[FEATURE_EXTRACTION] = (fe, 1, fe_logits)
        report(NAMES[FEATURE_EXTRACTION])(1, 1, 0.0, float((fe_logits.argmax(1) == val_set.labels).float().mean()))
    if decision.chosen != FEATURE_EXTRACTION:
        torch.manual_seed(config.seed)  # the same model as a run of this strategy alone, trial or not
        model, frozen = _strategy_model(base, decision.chosen, n_classes, decision.freeze_first_k)
        ran, _, resumed_from = _fit(
            model, frozen, train_set, val_set, normalize, config, decision.chosen, report(NAMES[decision.chosen]),
            checkpoint, should_stop,
        )  # fmt: skip
        candidates[decision.chosen] = (model, ran, _forward(model, val_set.pixels, normalize)[0])

    scores = {s: float((c[2].argmax(1) == val_set.labels).float().mean()) for s, c in candidates.items()}
    if len(scores) > 1:
        # The trial overrules the rule only by more than two standard errors of the validation
        # accuracy: small validation splits are noisy, and a coin flip is no confirmation.
        rule, alternative = scores[decision.chosen], scores[FEATURE_EXTRACTION]
        margin = 2 * math.sqrt(max(rule * (1 - rule), 0.25 / len(val_set)) / len(val_set))
        decision.trial = {NAMES[s]: a for s, a in scores.items()}
        tried = f"{NAMES[decision.chosen]} {rule:.1%}, feature extraction {alternative:.1%}"
        if alternative > rule + margin:
            decision.reason += f"; the validation split clearly preferred feature extraction ({tried})"
            decision.chosen = FEATURE_EXTRACTION
        else:
            decision.reason += f"; confirmed on the validation split ({tried})"
    model, epochs_run, val_logits = candidates[decision.chosen]

    temperature = calibration.fit_temperature(val_logits, val_set.labels)
    confidence, predicted = torch.softmax(val_logits / temperature, 1).max(1)
    threshold = calibration.threshold_for_precision(confidence, predicted == val_set.labels, config.target_precision)
    final_emb = train_emb if decision.chosen == FEATURE_EXTRACTION else _forward(model, train_set.pixels, normalize)[1]
    metrics = {
        "val_accuracy": scores[decision.chosen],
        "val_examples": float(len(val_set)),
        "train_examples": float(len(train_set)),
        "epochs": float(epochs_run),
        "train_seconds": time.monotonic() - started,
        "temperature": temperature,
        "target_precision": config.target_precision,
        "auto_accept_coverage": threshold.coverage,
        "auto_accept_precision": threshold.precision,
    }
    if similarity is not None:
        metrics["similarity"] = similarity
    if resumed_from:
        metrics["resumed_from_epoch"] = float(resumed_from)
    return TrainResult(
        model=model.cpu().eval(),
        arch=base.arch,
        classes=examples.classes,
        preprocess=base.preprocess,
        decision=decision,
        metrics=metrics,
        temperature=temperature,
        threshold=threshold.value,
        reference=reference_statistics(final_emb.numpy()),
    )

"""The training loop of the strategies that backpropagate through the backbone, and its recipe.

A recipe for small data: a budget of optimisation *steps* (about 40 epochs, never fewer than
``MIN_STEPS``, so that 100 images get as much optimisation as 1,000 get in 4 epochs), AdamW with
weight decay, label smoothing, a linear warm-up then cosine decay to zero, random resized crops
and flips (training/augment.py). The held-out loss is measured at ``EVALS`` points of the run; the
engine finds the share of the budget where the loss averaged over all cross-fitting folds is
lowest, so the choice rests on every labelled example, not on a 30-image split, and trains the
final model on every example for that share of its own budget (``shortened``). A fold stops
early only when its smoothed held-out loss has not improved for 30 % of the run, after at least
half of it; evaluations during the warm-up count for neither (``Recipe.warmup_evals``).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from prelabel.models import backbones
from prelabel.training import stages
from prelabel.training.augment import Augment
from prelabel.training.data import Examples
from prelabel.training.strategy import FREEZE_FIRST_K, FROM_SCRATCH, FULL_FINE_TUNE

EPOCHS = 40  # of the training set, when the bounds below allow
MIN_STEPS, MAX_STEPS = 150, 1500
EVALS = 20  # held-out evaluations per run
RESIDENT_BYTES = 2 * 2**30  # training images up to this size live on the GPU for the whole run
REPORT_EVERY_S = 1.0  # progress between evaluations too: a job's heartbeat (and a cancel) rides on it
# (peak learning rate of the head, the backbone's as a share of it)
RATES = {FREEZE_FIRST_K: (2e-3, 0.5), FULL_FINE_TUNE: (2e-3, 0.2), FROM_SCRATCH: (2e-3, 1.0)}


class Stopped(Exception):
    """Training stopped because ``should_stop`` said so (the job was cancelled, or the worker is leaving)."""


@dataclass(frozen=True)
class Recipe:
    steps: int
    batch_size: int
    lr: float
    body_ratio: float
    weight_decay: float = 0.05
    label_smoothing: float = 0.1
    warmup: float = 0.1  # share of the steps
    augment: Augment = field(default_factory=Augment)

    @property
    def eval_steps(self) -> list[int]:
        return sorted({max(1, round(self.steps * i / EVALS)) for i in range(1, EVALS + 1)})

    @property
    def warmup_evals(self) -> int:
        """Evaluations made during the warm-up: not candidates for the best point of a run. The first
        is of a barely trained model, and the loss often spikes far above it as the learning rate
        rises (from scratch, hopper-colour: 2.0, then 122 and 298); smoothed, that start would look
        best for many evaluations and stop the run at half its budget."""
        return sum(1 for step in self.eval_steps if step <= self.warmup_steps)

    @property
    def warmup_steps(self) -> int:
        return max(1, round(self.steps * self.warmup))

    def rate(self, step: int) -> float:
        """The learning-rate factor at ``step``: linear warm-up, then cosine decay to zero."""
        warm = self.warmup_steps
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, self.steps - warm)))


def recipe(strategy: str, n_train: int, epochs: int = 0, learning_rate: float = 0.0) -> Recipe:
    """The default recipe for ``n_train`` training images; ``epochs`` or ``learning_rate`` override it."""
    batch = 32 if n_train < 2000 else 64
    per_epoch = math.ceil(n_train / batch)
    steps = epochs * per_epoch if epochs else min(MAX_STEPS, max(MIN_STEPS, EPOCHS * per_epoch))
    lr, ratio = RATES[strategy]
    return Recipe(steps=steps, batch_size=batch, lr=learning_rate or lr, body_ratio=ratio)


def shortened(recipe: Recipe, share: float) -> Recipe:
    """``recipe`` cut to ``share`` of its steps, with its warm-up and decay compressed to fit."""
    return replace(recipe, steps=max(1, round(recipe.steps * min(1.0, share))))


@dataclass
class Run:
    """One training run: the model where it stopped, and held-out loss and logits at each evaluation."""

    model: backbones.Classifier
    steps_done: int
    losses: list[float] = field(default_factory=list)
    accuracies: list[float] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)
    resumed_from: int = 0

    def summary(self) -> dict[str, Any]:
        """What a checkpoint keeps of a finished run (its model is not needed again)."""
        return {"steps_done": self.steps_done, "losses": self.losses, "accuracies": self.accuracies,
                "logits": self.logits}  # fmt: skip


Report = Callable[[int, float, float, float], None]  # step, training loss, held-out accuracy (nan without), images/s


@torch.no_grad()
def predict(model: backbones.Classifier, pixels: torch.Tensor, normalize: backbones.Normalizer, batch: int = 256,
            check: Callable[[], None] = lambda: None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(logits, embeddings) in eval mode, on the CPU; ``check`` runs before each batch (it may raise Stopped)."""
    model.eval()
    logits, embeddings = [], []
    for i in range(0, len(pixels), batch):
        check()
        with torch.autocast("cuda", dtype=torch.float16, enabled=normalize.device.type == "cuda"):
            out, emb = model(normalize(pixels[i : i + batch]))
        logits.append(out.float().cpu())
        embeddings.append(emb.float().cpu())
    return torch.cat(logits), torch.cat(embeddings)


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """Mixed precision on CUDA: bf16 where the card has it (fp32's range, so no loss scaling, no skipped
    steps and no scheduler warning), fp16 with a GradScaler on older cards; None (fp32) on the CPU."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _smoothed(losses: list[float]) -> list[float]:
    out: list[float] = []
    for x in losses:
        out.append(x if not out else 0.5 * out[-1] + 0.5 * x)
    return out


def fit(
    model: backbones.Classifier,
    frozen: list[nn.Module],
    train: Examples,
    held_out: Examples | None,
    normalize: backbones.Normalizer,
    recipe: Recipe,
    seed: int,
    report: Report,
    should_stop: Callable[[], bool],
    save_on_stop: Callable[[], bool] = lambda: True,
    resume: dict[str, Any] | None = None,
    save: Callable[[dict[str, Any]], None] | None = None,
    save_every_s: float = 10.0,
) -> Run:
    """Train ``model`` on ``train`` by ``recipe``.

    With ``held_out``, the loss and logits on it are recorded at each evaluation step, and the run
    may stop early. ``save`` receives the whole state at most every ``save_every_s`` seconds and
    when stopped (if ``save_on_stop`` says so: not for a cancelled job); ``resume`` is such a state.
    """
    device = normalize.device
    model.to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    head = list(model.head.parameters())
    body = [p for p in model.body.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [{"params": body, "lr": recipe.lr * recipe.body_ratio}, {"params": head, "lr": recipe.lr}],
        weight_decay=recipe.weight_decay,
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, recipe.rate)
    amp = autocast_dtype(device)
    scaler = torch.amp.GradScaler("cuda", enabled=amp == torch.float16)
    generator = torch.Generator().manual_seed(seed)
    run = Run(model, 0)
    order, cursor = torch.randperm(len(train), generator=generator), 0
    pixels, labels = resident(train.pixels, device), resident(train.labels, device)
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        schedule.load_state_dict(resume["schedule"])
        scaler.load_state_dict(resume["scaler"])
        generator.set_state(resume["generator"])
        order, cursor = resume["order"], resume["cursor"]
        run.steps_done, run.losses, run.accuracies, run.logits = (
            resume["steps_done"], resume["losses"], resume["accuracies"], resume["logits"])  # fmt: skip
        run.resumed_from = run.steps_done
    placed = order.to(pixels.device)  # the epoch's order on the images' device, copied once per epoch
    evals = set(recipe.eval_steps)
    # The running loss stays on the device: reading it every step would make the host wait for the GPU.
    last_save, total, seen, since = time.monotonic(), torch.zeros((), device=device), 0, time.monotonic()

    def state() -> dict[str, Any]:
        return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                "scaler": scaler.state_dict(), "generator": generator.get_state(), "order": order, "cursor": cursor,
                **run.summary()}  # fmt: skip

    model.train()
    stages.keep_frozen_in_eval(frozen)
    while run.steps_done < recipe.steps:
        if should_stop():
            if save and save_on_stop():
                save(state())
            raise Stopped(f"stopped at step {run.steps_done} of {recipe.steps}")
        if cursor + recipe.batch_size > len(order):
            order, cursor = torch.randperm(len(train), generator=generator), 0
            placed = order.to(pixels.device)
        index = placed[cursor : cursor + recipe.batch_size]
        cursor += recipe.batch_size
        x = recipe.augment(normalize(pixels[index]), generator)
        y = labels[index].to(device, non_blocking=True)
        with torch.autocast("cuda", dtype=amp or torch.float16, enabled=amp is not None):
            loss = F.cross_entropy(model(x)[0], y, label_smoothing=recipe.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        torch.autograd.backward(scaler.scale(loss))
        scaler.step(optimizer)
        scaler.update()
        schedule.step()
        run.steps_done += 1
        total, seen = total + loss.detach().float() * len(index), seen + len(index)
        evaluate = run.steps_done in evals or run.steps_done == recipe.steps
        if not evaluate and time.monotonic() - since >= REPORT_EVERY_S:
            report(run.steps_done, float(total) / seen, math.nan, seen / (time.monotonic() - since))
            total, seen, since = torch.zeros((), device=device), 0, time.monotonic()
        if evaluate:
            accuracy = math.nan
            if held_out is not None:
                logits, _ = predict(model, held_out.pixels, normalize)
                run.losses.append(float(F.cross_entropy(logits, held_out.labels)))
                accuracy = float((logits.argmax(1) == held_out.labels).float().mean())
                run.accuracies.append(accuracy)
                run.logits.append(logits)
                model.train()
                stages.keep_frozen_in_eval(frozen)
            report(run.steps_done, float(total) / max(seen, 1), accuracy, seen / max(time.monotonic() - since, 1e-6))
            total, seen, since = torch.zeros((), device=device), 0, time.monotonic()
            if held_out is not None and _stale(run.losses[recipe.warmup_evals :]):
                break
        if save and time.monotonic() - last_save >= save_every_s:
            save(state())
            last_save = time.monotonic()
    model.eval()
    return run


def resident(data: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``data`` on the GPU for the whole run where it fits (a few hundred MB for thousands of 224 px
    images), so that no step waits for a copy from the host; else in pinned memory, copied per batch
    without blocking. Unchanged on the CPU."""
    if device.type != "cuda":
        return data
    if data.numel() * data.element_size() <= RESIDENT_BYTES:
        return data.to(device)
    return data.pin_memory()


def _stale(losses: list[float]) -> bool:
    """Early stopping that a small held-out set cannot fool: smoothed, late, and after a long wait.
    ``losses`` are those after the warm-up (``Recipe.warmup_evals``)."""
    if len(losses) < EVALS // 2:
        return False
    smooth = _smoothed(losses)
    best = min(range(len(smooth)), key=smooth.__getitem__)
    return len(smooth) - 1 - best >= round(0.3 * EVALS)


def strategy_model(base_model: backbones.Classifier, base_arch: str, family: str, strategy: str, classes: int,
                   k: int, image_size: int) -> tuple[backbones.Classifier, list[nn.Module], str]:  # fmt: skip
    """The network a strategy trains, the stages it keeps frozen, and its architecture's name.

    From scratch is always a ResNet-18, whatever the base: it trains from random weights on a few
    hundred images (MobileNets and ViTs do not), and BatchNorm's default momentum tracks its
    statistics within a short run.
    """
    if strategy == FROM_SCRATCH:
        return backbones.build(SCRATCH_ARCH, classes, image_size=image_size), [], SCRATCH_ARCH
    model = copy.deepcopy(base_model)
    model.head = nn.Linear(model.embedding_dim, classes)
    if strategy == FREEZE_FIRST_K:
        return model, stages.freeze_first(model, family, k), base_arch
    return model, [], base_arch


SCRATCH_ARCH = "resnet18"

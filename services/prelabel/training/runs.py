"""Progress and checkpoints across a training job's runs, so that train() only orchestrates.

A job is several runs of the training loop (each cross-fitting fold, then the final run): progress
is reported as a share of all of them, and a job that is stopped or killed resumes where it was.
"""

from __future__ import annotations

import io
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from prelabel.files import write_atomically
from prelabel.training import loop
from prelabel.training.loop import Stopped


@dataclass
class Progress:
    stage: str
    step: int
    steps: int
    loss: float  # training loss since the last report (nan where nothing trains)
    accuracy: float  # on the held-out fold (nan without one)
    fraction: float  # of the whole job
    eta_s: float
    images_per_s: float = math.nan  # training speed since the last report (nan where nothing trains)
    new_steps: int = 0  # optimisation steps since the last report

    @property
    def message(self) -> str:
        parts = [f"{self.stage}: step {self.step}/{self.steps}"]
        if not math.isnan(self.loss):
            parts.append(f"loss {self.loss:.3f}")
        if not math.isnan(self.accuracy):
            parts.append(f"held-out accuracy {self.accuracy:.1%}")
        return ", ".join(parts) + f", about {self.eta_s:.0f}s left"


ProgressCallback = Callable[[Progress], None]


@dataclass
class Checkpoint:
    """The job's training state: finished cross-fitting runs and the current run's latest state.

    Saved to a temporary file and renamed, so a kill mid-save leaves the previous checkpoint whole.
    """

    path: Path
    every_s: float = 10.0  # a run saves its state at most this often, and whenever it is stopped

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


class Runs:
    """A job's runs (cross-fitting folds, the final run): progress across all of them, and their checkpoint.

    A run finished before a restart is skipped; the one that was cut resumes from its saved state.
    """

    def __init__(self, key: str, notify: ProgressCallback, checkpoint: Checkpoint | None,
                 should_stop: Callable[[], bool], save_on_stop: Callable[[], bool]) -> None:  # fmt: skip
        self.notify, self.checkpoint = notify, checkpoint
        self.should_stop, self.save_on_stop = should_stop, save_on_stop
        self.started = time.monotonic()
        saved = checkpoint.load() if checkpoint else None
        self.state: dict[str, Any] = saved if saved and saved.get("key") == key else {"key": key, "runs": {}}
        self.resumed_from = sum(r["steps_done"] for r in self.state["runs"].values()) + (
            self.state["current"]["state"]["steps_done"] if self.state.get("current") else 0
        )
        self.planned, self.done = 1, 0
        self.save_every_s = checkpoint.every_s if checkpoint else math.inf

    def check(self) -> None:
        if self.should_stop():
            raise Stopped("stopped")

    def report(self, stage: str, step: int, steps: int, loss: float = math.nan, accuracy: float = math.nan,
               advance: int = 0, speed: float = math.nan) -> None:  # fmt: skip
        self.done += advance
        fraction = min(1.0, self.done / max(self.planned, 1))
        elapsed = time.monotonic() - self.started
        eta = elapsed / fraction * (1 - fraction) if fraction > 0 else math.nan
        self.notify(Progress(stage, step, steps, loss, accuracy, fraction, eta, speed, advance))

    def run(self, name: str, stage: str, start: Callable[[dict[str, Any] | None, Callable[..., None]], loop.Run],
            keep: bool = True) -> dict[str, Any]:  # fmt: skip
        """A run's summary (and ``model``): from the checkpoint, or by running ``start`` (resumed if it was cut).

        ``keep``: record the finished run in the checkpoint, so that a restarted job skips it.
        """
        if name in self.state["runs"]:
            summary: dict[str, Any] = self.state["runs"][name]
            self.done += summary["steps_done"]
            return summary
        current = self.state.get("current")
        resume = current["state"] if current and current["name"] == name else None
        if resume:
            self.done += resume["steps_done"]
        last = resume["steps_done"] if resume else 0

        def report(step: int, loss: float, accuracy: float, speed: float, steps: int) -> None:
            nonlocal last
            self.report(stage, step, steps, loss, accuracy, advance=step - last, speed=speed)
            last = step

        run = start(resume, report)
        self.state.pop("current", None)
        if keep:
            self.state["runs"][name] = run.summary()
            if self.checkpoint:
                self.checkpoint.save(self.state)
        return run.summary() | {"model": run.model}

    def save_current(self, name: str) -> Callable[[dict[str, Any]], None]:
        def save(state: dict[str, Any]) -> None:
            if self.checkpoint:
                self.state["current"] = {"name": name, "state": state}
                self.checkpoint.save(self.state)

        return save

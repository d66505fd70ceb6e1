"""``prelabel train DIR --base MODEL --name NAME``: fine-tune on an image folder, publish, load into Triton."""

from __future__ import annotations

import argparse
import asyncio
import sys

from prelabel.cli.progress import StatusBar
from prelabel.settings import Settings
from prelabel.spec import full_name
from prelabel.training import data, engine
from prelabel.training.publish import load_into_triton, publish, running_triton
from prelabel.triton.repository import repository_for


def train(settings: Settings, args: argparse.Namespace) -> int:
    repository = repository_for(settings)
    base = engine.load_base(repository, args.base, args.base_version)
    print(f"reading {args.folder} ...", file=sys.stderr)
    examples = data.from_folder(args.folder, base.preprocess)
    counts = ", ".join(f"{c} {n}" for c, n in examples.counts().items())
    print(f"{len(examples)} images in {len(examples.classes)} classes ({counts})", file=sys.stderr)
    config = engine.TrainConfig(
        strategy=full_name(args.strategy),
        freeze_first_k=args.freeze_first_k,
        epochs=args.epochs,
        learning_rate=args.learning_rate,
        seed=args.seed,
        target_precision=args.target_precision,
        device=settings.trainer_device,
        scratch_trial=settings.trainer_scratch_trial,
    )
    with StatusBar(disable=args.no_progress) as bar:

        def show(p: engine.Progress) -> None:
            bar.show(f"{p.stage} {p.step}/{p.steps}", p.message.partition(", ")[2], p.fraction)

        result = engine.train(base, examples, config, show)
    version = publish(repository, args.name, result, base)
    print(f"published {args.name} version {version}: {result.decision.reason}")
    print(f"{result.summary}; {result.metrics['train_seconds']:.0f}s")
    url = running_triton(settings)
    if url and asyncio.run(load_into_triton(url, args.name)):
        print(f"loaded into Triton at {url}: Predict with model={args.name!r} uses version {version}")
    elif not url:
        print("no running Triton found: the version is served when `prelabel serve` next starts")
    return 0

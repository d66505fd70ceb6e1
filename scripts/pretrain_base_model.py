#!/usr/bin/env python3
"""Pre-train Prelabel's base model on Prelabel Formulas (generated images only) and write its assets.

    .venv/bin/python scripts/pretrain_base_model.py --steps 2400

Writes, under services/prelabel/models/assets/: the weights (fp16), a model card (JSON: architecture,
labels, preprocessing, how it was trained and how long it took, held-out accuracy) and reference
statistics of its embeddings on the pre-training data. Deterministic for a given seed and thread
count. No photo is used: the images come from prelabel.datasets.formulas.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import platform
import time

import numpy as np
import torch
import torch.nn.functional as F

from prelabel.datasets import formulas
from prelabel.models import backbones, base
from prelabel.training.augment import Augment


def _generate(job: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    count, size, seed = job
    return formulas.sample(count, size, seed)


def generate(count: int, size: int, seed: int, processes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The pre-training set, made in ``processes`` seeded chunks (the same images whatever the count)."""
    chunk = formulas.NUM_CLASSES * 8
    jobs = [(chunk, size, seed * 100_003 + i) for i in range(math.ceil(count / chunk))]
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        parts = pool.map(_generate, jobs)
    images = torch.from_numpy(np.concatenate([p[0] for p in parts])[:count])
    labels = torch.from_numpy(np.concatenate([p[1] for p in parts])[:count])
    return images, labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2400)
    parser.add_argument("--images", type=int, default=formulas.NUM_CLASSES * 160, help="generated training images")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-images", type=int, default=formulas.NUM_CLASSES * 8)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    started = time.monotonic()
    images, labels = generate(args.images, base.IMAGE_SIZE, args.seed, os.cpu_count() or 1)
    eval_images, eval_labels = generate(args.eval_images, base.IMAGE_SIZE, args.seed + 1, os.cpu_count() or 1)
    print(f"generated {len(images)} + {len(eval_images)} images in {time.monotonic() - started:.0f}s", flush=True)

    preprocess = backbones.Preprocess(resize=base.IMAGE_SIZE, crop=base.IMAGE_SIZE)
    normalize = backbones.Normalizer(preprocess, torch.device("cpu"))
    model = backbones.build(base.ARCH, num_classes=formulas.NUM_CLASSES)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    warmup = max(1, args.steps // 20)

    def rate(s: int) -> float:  # linear warm-up over 5 % of the steps, then cosine decay to zero
        return (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / (args.steps - warmup)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, rate)
    augment = Augment(min_scale=0.25)
    generator = torch.Generator().manual_seed(args.seed)
    trained_at = time.monotonic()
    model.train()
    order = torch.randperm(len(images), generator=generator)
    cursor = 0
    for step in range(1, args.steps + 1):
        if cursor + args.batch_size > len(order):
            order, cursor = torch.randperm(len(images), generator=generator), 0
        index = order[cursor : cursor + args.batch_size]
        cursor += args.batch_size
        x = augment(normalize(images[index]), generator)
        logits, _ = model(x)
        loss = F.cross_entropy(logits, labels[index], label_smoothing=0.1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 50 == 0 or step == args.steps:
            rate = step * args.batch_size / (time.monotonic() - trained_at)
            print(f"step {step}/{args.steps} loss {loss.item():.3f} {rate:.0f} img/s", flush=True)

    model.eval()
    with torch.inference_mode():
        outs = [model(normalize(eval_images[i : i + 256])) for i in range(0, len(eval_images), 256)]
    logits = torch.cat([o[0] for o in outs])
    embeddings = torch.cat([o[1] for o in outs])
    accuracy = float((logits.argmax(1) == eval_labels).float().mean())
    print(f"held-out accuracy {accuracy:.4f}")

    out = base.files()
    out.weights.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}, out.weights)
    np.savez_compressed(out.reference, **base.reference_statistics(embeddings.numpy()))
    card = {
        "name": base.NAME,
        "arch": base.ARCH,
        "labels": list(formulas.CLASSES),
        "preprocess": preprocess.to_dict(),
        "pretraining": {
            "dataset": "Prelabel Formulas (generated: fractals, noise, gratings, dead leaves; "
            "prelabel.datasets.formulas)",
            "images": len(images),
            "steps": args.steps,
            "batch_size": args.batch_size,
            "seed": args.seed,
            "seconds": round(time.monotonic() - started, 1),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}",
            "heldout_accuracy": round(accuracy, 4),
        },
    }
    out.card.write_text(json.dumps(card, indent=2) + "\n")
    print(f"wrote {out.weights} ({out.weights.stat().st_size / 1e6:.1f} MB), {out.card}, {out.reference}")


if __name__ == "__main__":
    main()

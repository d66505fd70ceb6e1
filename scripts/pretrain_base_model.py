#!/usr/bin/env python3
"""Pre-train Prelabel's base model on the generated Prelabel Shapes dataset and write its assets.

    .venv/bin/python scripts/pretrain_base_model.py --steps 1500

Writes, under services/prelabel/models/assets/: the weights (fp16, a few MB), a model card (JSON:
architecture, labels, preprocessing, how it was trained, held-out accuracy) and reference statistics
of its embeddings on the pre-training data. Deterministic for a given seed and thread count.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from torch import nn

from prelabel.datasets import shapes
from prelabel.models import backbones, base


def to_tensor(images: np.ndarray, preprocess: backbones.Preprocess) -> torch.Tensor:
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255)
    mean = torch.tensor(preprocess.mean).view(1, 3, 1, 1)
    std = torch.tensor(preprocess.std).view(1, 3, 1, 1)
    return (x - mean) / std


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-images", type=int, default=2000)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    preprocess = backbones.Preprocess(resize=base.IMAGE_SIZE, crop=base.IMAGE_SIZE)
    model = backbones.build(base.ARCH, num_classes=len(shapes.CLASSES))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=args.steps, pct_start=0.1)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.05)
    stream = shapes.batches(args.batch_size, base.IMAGE_SIZE, seed=args.seed)
    started = time.monotonic()
    model.train()
    for step in range(1, args.steps + 1):
        images, labels = next(stream)
        logits, _ = model(to_tensor(images, preprocess))
        loss = loss_fn(logits, torch.from_numpy(labels))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 50 == 0 or step == args.steps:
            rate = step * args.batch_size / (time.monotonic() - started)
            print(f"step {step}/{args.steps} loss {loss.item():.3f} {rate:.0f} img/s", flush=True)

    model.eval()
    eval_images, eval_labels = shapes.sample(args.eval_images, base.IMAGE_SIZE, seed=args.seed + 1)
    stacked = np.stack([np.asarray(im) for im in eval_images])
    with torch.inference_mode():
        logits, embeddings = zip(
            *(model(to_tensor(stacked[i : i + 256], preprocess)) for i in range(0, len(stacked), 256)), strict=True
        )
    accuracy = float((torch.cat(logits).argmax(1).numpy() == np.asarray(eval_labels)).mean())
    print(f"held-out accuracy {accuracy:.4f}")

    out = base.files()
    out.weights.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}, out.weights)
    np.savez_compressed(out.reference, **base.reference_statistics(torch.cat(embeddings).numpy()))
    card = {
        "name": base.NAME,
        "arch": base.ARCH,
        "labels": list(shapes.CLASSES),
        "preprocess": preprocess.to_dict(),
        "pretraining": {
            "dataset": "Prelabel Shapes (generated, prelabel.datasets.shapes)",
            "steps": args.steps,
            "batch_size": args.batch_size,
            "seed": args.seed,
            "seconds": round(time.monotonic() - started, 1),
            "heldout_accuracy": round(accuracy, 4),
        },
    }
    out.card.write_text(json.dumps(card, indent=2) + "\n")
    print(f"wrote {out.weights} ({out.weights.stat().st_size / 1e6:.1f} MB), {out.card}, {out.reference}")


if __name__ == "__main__":
    main()

"""Real training on small data: strategies, AUTO's choice, calibration, input checks (no Triton here)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter, ImageOps

from prelabel.datasets import digits, shapes
from prelabel.errors import InvalidArgument
from prelabel.models import backbones
from prelabel.models.defaults import ensure_default_model
from prelabel.models.runner import Runner
from prelabel.training import calibration, data, engine, stages
from prelabel.triton.repository import ModelRepository


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> ModelRepository:
    repo = ModelRepository(tmp_path_factory.mktemp("models"))
    ensure_default_model(repo, "prelabel-base", "builtin")
    return repo


@pytest.fixture(scope="module")
def base(repository: ModelRepository) -> engine.Base:
    return engine.load_base(repository, "prelabel-base")


def novel(per_class: int, seed: int, base: engine.Base) -> data.Examples:
    images, labels = shapes.sample(per_class * len(shapes.NOVEL_CLASSES), 64, seed, shapes.NOVEL_CLASSES)
    return data.from_images(images, [shapes.NOVEL_CLASSES[y] for y in labels], base.preprocess)


def shifted(image: Image.Image) -> Image.Image:
    """The base's own classes in another domain: grey, inverted, blurred."""
    return ImageOps.invert(ImageOps.grayscale(image).filter(ImageFilter.GaussianBlur(1.2))).convert("RGB")


def png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def test_input_checks_say_what_to_fix(base, tmp_path):
    one = tmp_path / "one" / "cats"
    one.mkdir(parents=True)
    for i in range(3):
        shapes.render(0, 32, np.random.default_rng(i)).save(one / f"{i}.png")
    with pytest.raises(InvalidArgument, match="at least 2 classes"):
        data.from_folder(tmp_path / "one", base.preprocess)
    (tmp_path / "one" / "dogs").mkdir()
    shapes.render(1, 32, np.random.default_rng(9)).save(tmp_path / "one" / "dogs" / "0.png")
    with pytest.raises(InvalidArgument, match=r"at least 3 examples; too few: dogs \(1\)"):
        data.from_folder(tmp_path / "one", base.preprocess)
    (tmp_path / "one" / "dogs" / "bad.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(InvalidArgument, match=r"1 image\(s\) could not be read: dogs/bad.jpg"):
        data.from_folder(tmp_path / "one", base.preprocess)
    with pytest.raises(InvalidArgument, match="not a folder"):
        data.from_folder(tmp_path / "missing", base.preprocess)


def test_split_is_stratified_and_seeded(base):
    examples = novel(10, 1, base)
    train, val = data.split(examples, 0.2, seed=3)
    assert len(train) + len(val) == len(examples)
    assert all(n == 2 for n in val.counts().values()) and all(n == 8 for n in train.counts().values())
    again, _ = data.split(examples, 0.2, seed=3)
    assert torch.equal(train.labels, again.labels) and torch.equal(train.pixels, again.pixels)


@pytest.mark.parametrize(("arch", "count"), [("resnet18", 5), ("mobilenet_v3_small", 13), ("vit_b_16", 13)])
def test_stages_and_frozen_batchnorm(arch, count):
    model = backbones.build(arch, 3, image_size=224 if arch == "vit_b_16" else None)
    family = backbones.architecture(arch).family
    assert len(stages.stages(model, family)) == count
    frozen = stages.freeze_first(model, family, 2)
    frozen_params = {id(p) for s in frozen for p in s.parameters()}
    assert frozen_params and all(not p.requires_grad for s in frozen for p in s.parameters())
    assert all(p.requires_grad for p in model.parameters() if id(p) not in frozen_params)
    model.train()
    stages.keep_frozen_in_eval(frozen)
    norms = [m for s in frozen for m in s.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(not m.training for m in norms)
    with pytest.raises(ValueError, match="stages"):
        stages.freeze_first(model, family, count + 1)


def test_threshold_for_target_precision():
    confidence = torch.tensor([0.99, 0.95, 0.9, 0.8, 0.7, 0.6])
    correct = torch.tensor([True, True, True, False, True, False])
    t = calibration.threshold_for_precision(confidence, correct, 0.9)
    assert (t.value, t.coverage, t.precision) == (pytest.approx(0.9), 0.5, 1.0)
    assert calibration.threshold_for_precision(confidence, torch.zeros(6, dtype=torch.bool), 0.9).value is None
    logits = torch.tensor([[4.0, 0.0], [4.0, 0.0], [0.0, 4.0], [4.0, 0.0]])
    assert calibration.fit_temperature(logits, torch.tensor([0, 1, 1, 0])) > 1.5  # over-confident: T > 1


def test_auto_picks_feature_extraction_for_small_similar_data_and_is_deterministic(base):
    examples = novel(12, 5, base)
    result = engine.train(base, examples, engine.TrainConfig())
    d = result.decision
    assert d.chosen == engine.FEATURE_EXTRACTION and d.similarity is not None and d.similarity >= engine.HIGH_SIMILARITY
    assert "12 per class" in d.reason and "feature extraction" in d.reason
    assert result.metrics["val_accuracy"] > 0.5 and result.metrics["train_seconds"] < 30
    again = engine.train(base, examples, engine.TrainConfig())
    assert torch.equal(result.model.head.weight, again.model.head.weight)


@pytest.mark.parametrize(
    "strategy", [engine.FEATURE_EXTRACTION, engine.FREEZE_FIRST_K, engine.FULL_FINE_TUNE, engine.FROM_SCRATCH]
)
def test_each_strategy_trains(base, strategy):
    examples = novel(12, 7, base)
    seen: list[engine.Progress] = []
    result = engine.train(base, examples, engine.TrainConfig(strategy=strategy, epochs=3), seen.append)
    assert result.decision.chosen == strategy and "as requested" in result.decision.reason
    assert seen and seen[-1].fraction == pytest.approx(1.0) and "validation accuracy" in seen[-1].message
    assert result.model.head.out_features == len(shapes.NOVEL_CLASSES)
    if strategy != engine.FROM_SCRATCH:  # three epochs from random weights on 60 images learn little
        assert result.metrics["val_accuracy"] > 1.5 / len(shapes.NOVEL_CLASSES)
    if strategy == engine.FEATURE_EXTRACTION:
        assert all(
            torch.equal(a, b) for a, b in zip(result.model.body.parameters(), base.model.body.parameters(), strict=True)
        )


def test_fine_tuned_model_beats_the_base_on_a_shifted_domain(base, repository, tmp_path):
    train_images, train_labels = shapes.sample(20 * len(shapes.CLASSES), 64, 31)
    examples = data.from_encoded(
        [png(shifted(im)) for im in train_images], [shapes.CLASSES[y] for y in train_labels], base.preprocess
    )
    result = engine.train(base, examples, engine.TrainConfig(strategy=engine.FEATURE_EXTRACTION))
    from prelabel.training.publish import publish

    version = publish(repository, "shifted", result, base)
    test_images, test_labels = shapes.sample(200, 64, 32)
    blobs = [png(shifted(im)) for im in test_images]
    truth = np.array(test_labels)
    base_accuracy = (
        Runner(repository.version_dir("prelabel-base", 1)).run(blobs).probabilities.argmax(1) == truth
    ).mean()
    tuned = Runner(repository.version_dir("shifted", version))
    tuned_labels = np.array(
        [shapes.CLASSES.index(tuned.card.labels[i]) for i in tuned.run(blobs).probabilities.argmax(1)]
    )
    assert (tuned_labels == truth).mean() > base_accuracy + 0.05


def test_auto_fine_tunes_large_dissimilar_data_and_calibration_holds_on_held_out_data(base):
    images, labels = digits.load()
    rng = np.random.default_rng(0)
    order = rng.permutation(len(images))
    held_out, train_index = order[:300], order[300:]
    examples = data.from_images(
        [images[i] for i in train_index], [str(labels[i]) for i in train_index], base.preprocess
    )
    result = engine.train(base, examples, engine.TrainConfig(epochs=12, target_precision=0.95))
    d = result.decision
    assert d.similarity is not None and d.similarity < engine.HIGH_SIMILARITY and d.per_class >= engine.SMALL_PER_CLASS
    assert d.chosen in (engine.FULL_FINE_TUNE, engine.FROM_SCRATCH), d.reason
    assert d.trial[engine.NAMES[d.chosen]] >= d.trial[engine.NAMES[engine.FEATURE_EXTRACTION]]
    assert result.threshold is not None and result.metrics["auto_accept_coverage"] > 0.5

    pixels = data.from_images([images[i] for i in held_out], [str(labels[i]) for i in held_out], base.preprocess)
    normalize = backbones.Normalizer(base.preprocess, torch.device("cpu"))
    with torch.no_grad():
        logits, _ = result.model(normalize(pixels.pixels))
    confidence, predicted = torch.softmax(logits / result.temperature, 1).max(1)
    accepted = confidence >= result.threshold
    names = [result.classes[i] for i in predicted.tolist()]
    correct = torch.tensor([n == str(labels[i]) for n, i in zip(names, held_out, strict=True)])
    precision = float(correct[accepted].float().mean())
    n = int(accepted.sum())
    assert n > 100
    assert precision >= 0.95 - 2 * np.sqrt(0.95 * 0.05 / n), f"precision {precision:.3f} on {n} auto-accepted images"


def test_unknown_strategy_and_bad_precision(base):
    examples = novel(4, 1, base)
    with pytest.raises(InvalidArgument, match="unknown strategy"):
        engine.train(base, examples, engine.TrainConfig(strategy="STRATEGY_MAGIC"))
    with pytest.raises(InvalidArgument, match="target_precision"):
        engine.train(base, examples, engine.TrainConfig(target_precision=1.5))


def test_base_must_exist(repository):
    with pytest.raises(InvalidArgument, match="not in the repository"):
        engine.load_base(repository, "nope")


def test_similarity_fast_path_equals_the_frechet_formula():
    from prelabel.training.similarity import frechet, similarity

    rng = np.random.default_rng(0)
    a = rng.normal(size=(64, 64))
    reference = {"mean": rng.normal(size=64), "cov": a @ a.T / 64}
    for n in (20, 200):  # fewer and more images than dimensions: both code paths
        x = rng.normal(size=(n, 64)) * 1.3 + 0.2
        mean, cov = x.mean(0), np.cov(x, rowvar=False)
        direct = 1 - frechet(mean, cov, reference["mean"], reference["cov"]) / (
            np.trace(cov) + np.trace(reference["cov"])
        )
        assert similarity(x, reference) == pytest.approx(max(direct, 0.0), abs=1e-6)
    same = rng.multivariate_normal(reference["mean"], reference["cov"], size=5000)
    assert similarity(same, reference) > 0.97

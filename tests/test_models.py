"""Backbones, weight loading, the built-in base model and the runner that Triton uses."""

from __future__ import annotations

import importlib
import io
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_sample_images

from prelabel.batching import bounded
from prelabel.datasets import formulas
from prelabel.errors import InvalidArgument, NotFound, Unavailable
from prelabel.models import backbones, base, device_decode, jpeg_frame, resample
from prelabel.models.runner import Runner
from prelabel.preprocessing import ORIENTATIONS, ImageError, Preprocess, TooManyPixels, crop_box, decode
from prelabel.triton.defaults import ensure_default_model
from prelabel.triton.repository import ModelRepository
from tests.conftest import encode, formula_images, nvjpeg_pixels

EMBEDDING = {"resnet18": 512, "resnet50": 2048, "mobilenet_v3_small": 1024, "mobilenet_v3_large": 1280,
             "efficientnet_b0": 1280, "vit_b_16": 768}  # fmt: skip


@pytest.mark.parametrize("arch", sorted(backbones.ARCHITECTURES))
def test_every_architecture_splits_into_body_and_head(arch):
    size = 224 if arch == "vit_b_16" else 64
    model = backbones.build(arch, num_classes=3, image_size=size).eval()
    with torch.inference_mode():
        logits, embedding = model(torch.randn(2, 3, size, size))
    assert logits.shape == (2, 3) and embedding.shape == (2, EMBEDDING[arch])
    assert model.embedding_dim == EMBEDDING[arch]
    preprocess = backbones.architecture(arch).imagenet_preprocess()
    assert preprocess.crop == 224 and len(preprocess.mean) == 3


def test_stage_pooling_reads_every_stage_of_a_resnet():
    """``stages``: each stage's global average; ``texture``: the input's statistics, the first two stages'
    spreads, then ``stages``. Each pooling's embedding is a suffix of the richer one's."""
    plain = backbones.build("resnet18", 3).eval()
    stages = backbones.pooled_by_stage(plain, "resnet", 3, pooling="stages")
    texture = backbones.pooled_by_stage(plain, "resnet", 3)
    assert stages is not None and stages.pooling == "stages" and stages.embedding_dim == 64 + 128 + 256 + 512
    assert texture is not None and texture.pooling == "texture"
    assert texture.embedding_dim == backbones.INPUT_STATISTICS + 64 + 128 + 960 == 1198
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        logits, embedding = texture(x)
        torch.testing.assert_close(embedding[:, -960:], stages(x)[1])
        torch.testing.assert_close(embedding[:, -512:], plain(x)[1])
        body = plain.body
        layer1 = body.layer1(body.maxpool(body.relu(body.bn1(body.conv1(x)))))
        torch.testing.assert_close(embedding[:, backbones.INPUT_STATISTICS : backbones.INPUT_STATISTICS + 64],
                                   layer1.std((2, 3)))  # fmt: skip
    assert logits.shape == (2, 3)
    assert backbones.build("resnet50", 3, pooling="stages").embedding_dim == 256 + 512 + 1024 + 2048
    assert backbones.build("resnet50", 3, pooling="texture").embedding_dim == 46 + 256 + 512 + 3840
    assert backbones.pooled_by_stage(backbones.build("mobilenet_v3_small", 3), "mobilenet", 3) is None
    with pytest.raises(InvalidArgument, match="needs a ResNet"):
        backbones.build("mobilenet_v3_small", 3, pooling="stages")
    with pytest.raises(InvalidArgument, match="unknown pooling"):
        backbones.build("resnet18", 3, pooling="max")


def test_input_statistics_are_channel_moments_and_histograms_of_the_normalised_image():
    x = torch.zeros(1, 3, 4, 4)
    x[0, 0] = -3.0  # below the range: the first bin
    x[0, 1, :2] = 1.0  # half the pixels in bin 5 of 8 ([0.625, 1.25)), half in bin 4 ([0, 0.625))
    x[0, 2] = 2.5  # the top edge: the last bin
    stats = backbones.input_statistics(x)
    assert stats.shape == (1, backbones.INPUT_STATISTICS)
    torch.testing.assert_close(stats[0, :3], torch.tensor([-3.0, 0.5, 2.5]))
    colour = stats[0, 6 : 6 + 24].view(3, 8)
    torch.testing.assert_close(colour.sum(1), torch.ones(3))
    assert colour[0, 0] == 1 and colour[1, 4] == colour[1, 5] == 0.5 and colour[2, 7] == 1
    grey = stats[0, 30:]  # the channels' mean: -1/6 or 1/6 for half the pixels each, bins 7 and 8 of 16
    assert grey.sum() == 1 and grey[7] == grey[8] == 0.5


def test_unknown_architecture():
    with pytest.raises(InvalidArgument, match="resnet18"):
        backbones.build("alexnet", 2)


def test_torchvision_format_weights_load_into_the_split_model(tmp_path):
    import torchvision.models as tvm

    reference = tvm.resnet18(num_classes=7).eval()
    torch.save(reference.state_dict(), tmp_path / "resnet18.pth")
    model = backbones.build("resnet18", 7).eval()
    backbones.load_state(model, tmp_path / "resnet18.pth")
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        torch.testing.assert_close(model(x)[0], reference(x))
    with pytest.raises(NotFound):
        backbones.load_state(model, tmp_path / "missing.pth")
    with pytest.raises(InvalidArgument, match="does not fit"):
        backbones.load_state(backbones.build("resnet50", 7), tmp_path / "resnet18.pth")


def test_imagenet_weights_without_a_network_say_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(Unavailable) as err:
        backbones.imagenet("resnet18")
    assert "copy https://download.pytorch.org/models/resnet18" in err.value.message
    assert str(tmp_path / "hub" / "checkpoints") in err.value.message


def test_local_weights_file_as_the_default_model(tmp_path):
    import torchvision.models as tvm

    torch.save(tvm.resnet18().state_dict(), tmp_path / "r18.pth")
    repo = ModelRepository(tmp_path / "models")
    ensure_default_model(repo, "resnet18", f"resnet18:{tmp_path / 'r18.pth'}")
    c = repo.card("resnet18", 1)
    assert len(c.labels) == 1000 and c.labels[0] == "tench" and c.preprocess.crop == 224
    with pytest.raises(InvalidArgument, match="builtin, ARCH:imagenet"):
        ensure_default_model(repo, "other", "resnet18")


def test_builtin_base_model_is_small_and_documented():
    files = base.files()
    assert files.weights.stat().st_size <= 25 * 1024 * 1024
    card = files.read_card()
    assert card["arch"] == base.ARCH == "resnet18" and card["labels"] == list(formulas.CLASSES)
    assert card["pretraining"]["heldout_accuracy"] > 0.5 and "Formulas" in card["pretraining"]["dataset"]
    reference = np.load(files.reference)
    assert reference["mean"].shape == (512,) and reference["cov"].shape == (512, 512)


@pytest.fixture(scope="module")
def base_version(tmp_path_factory) -> Path:
    repo = ModelRepository(tmp_path_factory.mktemp("repo"))
    ensure_default_model(repo, "prelabel-base", "builtin")
    ensure_default_model(repo, "prelabel-base", "builtin")  # idempotent: still one version
    assert repo.versions("prelabel-base") == [1]
    return repo.version_dir("prelabel-base", 1)


@pytest.fixture(scope="module")
def runner(base_version) -> Runner:
    return Runner(base_version)


def test_runner_labels_generated_images_and_reports_bad_ones(runner):
    images, labels = formula_images(40, 96, seed=123)
    blobs = [encode(im, "PNG") for im in images] + [b"junk"]
    out = runner.run(blobs)
    predicted = [runner.card.labels[i] for i in out.probabilities[:40].argmax(1)]
    assert np.mean([p == t for p, t in zip(predicted, labels, strict=True)]) >= 0.7  # of 256 classes
    np.testing.assert_allclose(out.probabilities[:40].sum(1), 1.0, rtol=1e-5)
    assert out.error_codes.tolist() == [0] * 40 + [3]  # INVALID_ARGUMENT, as a number: no text to parse
    assert out.error_messages[:40] == [""] * 40 and "could not be decoded" in out.error_messages[40]
    assert not out.probabilities[40].any() and out.embeddings.shape == (41, 512)


def test_runner_temperature_softens_probabilities(runner):
    blob = [encode(formula_images(1, 64, seed=1)[0][0], "PNG")]
    sharp = runner.run(blob).probabilities.max()
    runner.card.temperature = 4.0
    try:
        soft = runner.run(blob).probabilities.max()
    finally:
        runner.card.temperature = 1.0
    assert soft < sharp


def _turned(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


def _photo_jpegs() -> dict[str, bytes]:
    photos = load_sample_images().images
    cmyk = io.BytesIO()
    Image.fromarray(photos[0]).convert("CMYK").save(cmyk, "JPEG")
    return {
        "jpeg": encode(Image.fromarray(photos[0]), "JPEG", quality=90),
        "jpeg-other-size": encode(Image.fromarray(photos[1][:300]), "JPEG", quality=80),
        "grey": encode(Image.fromarray(photos[1][:, :, 0]), "JPEG"),
        "progressive": encode(Image.fromarray(photos[0]), "JPEG", progressive=True),
        "turned (exif 6)": encode(Image.fromarray(photos[1][:300]), "JPEG", exif=_turned(6)),
        "mirrored (exif 5)": encode(Image.fromarray(photos[0]), "JPEG", exif=_turned(5)),
        "cmyk": cmyk.getvalue(),
        "png": encode(Image.fromarray(photos[0][:200, :300]), "PNG"),
        "corrupt": b"\xff\xd8\xff\xe0 not really a JPEG",
        "truncated": encode(Image.fromarray(photos[0]), "JPEG")[:20000],
        "empty": b"",
        "over-the-limit": encode(Image.fromarray(photos[0]), "JPEG"),
    }


# The device path runs on the CPU in CI (libjpeg-turbo, same code) and on the GPU too where there is one.
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_device_decoding_matches_pillow_and_keeps_per_image_errors(device):
    """The GPU path (nvJPEG on a GPU; libjpeg-turbo on the CPU) sees what the CPU path sees."""
    preprocess = Preprocess(resize=128, crop=112)
    images = _photo_jpegs()
    limits = [1000 if name == "over-the-limit" else 0 for name in images]
    on_device = device_decode.decode_batch(list(images.values()), preprocess, torch.device(device), limits)
    for (name, content), limit, got in zip(images.items(), limits, on_device, strict=True):
        try:
            expected: np.ndarray | ImageError = decode(content, preprocess, limit)
        except ImageError as exc:
            expected = exc
        if isinstance(expected, ImageError):
            assert type(got) is type(expected) and str(got) == str(expected), name
        else:
            assert isinstance(got, torch.Tensor) and got.dtype == torch.uint8 and got.shape == (112, 112, 3), name
            # Pillow decodes JPEGs at a reduced DCT scale (draft mode); the GPU path decodes in full and
            # resizes with antialiasing: a level or two apart on average, never a different picture.
            assert np.abs(got.cpu().numpy().astype(float) - expected.astype(float)).mean() < 3, name
    assert isinstance(on_device[-1], TooManyPixels)  # checked on the header, before any decode


@pytest.mark.parametrize("device", DEVICES)
def test_torchcodec_and_torchvision_decode_the_same_jpegs(device, monkeypatch):
    """The GPU path decodes with TorchCodec (torchvision's decoder is deprecated since 0.29) and keeps
    torchvision's where TorchCodec cannot load (an older torch): the same pixels, the same refusals."""
    from torchvision.io import decode_jpeg

    if device_decode.jpeg_decoder()[0] != "torchcodec":  # only where the pinned TorchCodec really cannot load
        with pytest.raises(Exception):  # noqa: B017 - absent, too old or built for another torch
            importlib.import_module("torchcodec.decoders").decode_jpeg  # noqa: B018
        return
    jpegs = [content for name, content in _photo_jpegs().items() if name != "empty"]
    turns = [frame.orientation if (frame := jpeg_frame.read_frame(c)) else 1 for c in jpegs]
    assert 5 in turns and 6 in turns  # TorchCodec turns photos by their EXIF; torchvision's are turned for it
    ours = device_decode.decode_jpegs(jpegs, torch.device(device), turns)
    monkeypatch.setattr(device_decode, "jpeg_decoder", lambda: ("torchvision", decode_jpeg))
    theirs = device_decode.decode_jpegs(jpegs, torch.device(device), turns)
    assert [o is None for o in ours] == [t is None for t in theirs]
    assert sum(o is not None for o in ours) >= 5 and sum(o is None for o in ours) >= 2  # corrupt, PNG
    for o, t in zip(ours, theirs, strict=True):
        if o is not None:
            assert torch.equal(o, t)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_the_gpu_path_turns_images_as_pillow_does(orientation):
    """Where the GPU path decodes with torchvision (it does not turn images by their EXIF on a GPU), it
    turns them itself: the same turn as Pillow's on the CPU path, for each of the eight orientations."""
    image = Image.fromarray(load_sample_images().images[0][:30, :50])
    turned = image.transpose(ORIENTATIONS[orientation]) if orientation in ORIENTATIONS else image
    decoded = torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous()  # [3, H, W], as decoders give
    ours = device_decode._upright(decoded, orientation)
    assert ours.is_contiguous() and torch.equal(ours.permute(1, 2, 0), torch.from_numpy(np.array(turned)))


def test_without_torchcodec_the_gpu_path_says_so_and_decodes_with_torchvision(monkeypatch, caplog):
    real = importlib.import_module

    def no_torchcodec(name: str, *args):  # as where TorchCodec was built for another torch
        if name.startswith("torchcodec"):
            raise OSError("libtorchcodec_core9.so: undefined symbol")
        return real(name, *args)

    monkeypatch.setattr(importlib, "import_module", no_torchcodec)
    with caplog.at_level("INFO", logger="prelabel.models.device_decode"):
        name, decode = device_decode.jpeg_decoder.__wrapped__()  # not the cached lookup
    assert name == "torchvision" and decode.__module__.startswith("torchvision")
    assert "TorchCodec's JPEG decoder is unavailable (libtorchcodec_core9.so: undefined symbol)" in caplog.text


def test_truncated_jpegs_go_to_the_cpu_path():
    """nvJPEG decodes a truncated JPEG without an error (grey where the data stops; found on an
    H200), so only files that end with the end-of-image marker are sent to it."""
    photo = Image.fromarray(load_sample_images().images[0][:200, :300])
    jpeg = encode(photo, "JPEG")
    assert nvjpeg_pixels(jpeg, 0) == 200 * 300
    assert nvjpeg_pixels(jpeg + b"\0" * 16, 0) == 200 * 300  # zero padding is harmless
    assert nvjpeg_pixels(jpeg[:-500], 0) is None
    assert nvjpeg_pixels(jpeg, 1000) is None  # over the limit: the CPU path says so


@pytest.mark.parametrize("device", DEVICES)
def test_device_decoding_bounds_the_pixels_of_one_pass(device):
    sizes = [(0, 40), (1, 40), (2, 30), (3, 100), (4, 10)]
    passes = [[i for i, _ in b] for b in bounded(sizes, lambda s: s[1], 80)]
    assert passes == [[0, 1], [2], [3], [4]]  # a large image goes alone
    images = list(_photo_jpegs().values())[:3]
    preprocess = Preprocess(resize=64, crop=64)
    whole = device_decode.decode_batch(images, preprocess, torch.device(device), [0] * 3)
    one_by_one = device_decode.decode_batch(images, preprocess, torch.device(device), [0] * 3, pixels_per_pass=1)
    for a, b in zip(whole, one_by_one, strict=True):  # float sums over other canvases: a level at most
        assert (a.int() - b.int()).abs().max() <= 1


_PILLOW = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
           "nearest": Image.Resampling.NEAREST}  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])  # float16: the default on a GPU
@pytest.mark.parametrize("interpolation", sorted(_PILLOW))
def test_batched_resampling_is_pillows_resize_with_a_box(interpolation, dtype):
    """Photos of many sizes (down- and upscaled, a one-pixel strip) resized in one batch give what
    Pillow gives each one alone, with the same fractional box: its fixed-point weights (and float16's
    rounding of ours) are the only difference. Split into one canvas per image, the same within a level."""
    photos = load_sample_images().images
    rng = np.random.default_rng(0)
    arrays = [photos[k % 2][: rng.integers(20, 427), : rng.integers(20, 640)] for k in range(8)]
    arrays += [photos[0][:50, :30], photos[1][:1, :400], photos[1][:300, :300]]
    preprocess = Preprocess(resize=128, crop=112, interpolation=interpolation)
    tensors = [torch.from_numpy(a.copy()).permute(2, 0, 1) for a in arrays]
    batched = resample.resize_crop(tensors, preprocess, dtype=dtype)
    alone = resample.resize_crop(tensors, preprocess, canvas_pixels=1, dtype=dtype)
    for array, got, got_alone in zip(arrays, batched, alone, strict=True):
        top, left, side = crop_box(array.shape[0], array.shape[1], preprocess)
        box = (left, top, left + side, top + side)
        expected = np.asarray(Image.fromarray(array).resize((112, 112), _PILLOW[interpolation], box=box)).astype(int)
        assert got.shape == (112, 112, 3) and got.dtype == torch.uint8
        difference = np.abs(got.numpy().astype(int) - expected)
        assert difference.max() <= (0 if interpolation == "nearest" else 3), array.shape
        assert difference.mean() < (0.05 if dtype == torch.float32 else 0.15), array.shape
        assert (got.int() - got_alone.int()).abs().max() <= 1


def test_batched_resampling_bounds_its_canvas():
    """Sorted by size and split so that no canvas (padding included) holds more than the bound."""
    chunks = resample._split([0, 1, 2, 3], lambda chunk: 100 * len(chunk) * (1 + max(chunk)), 700)
    assert chunks == [[0, 1], [2], [3]]  # [0, 1] needs 400, [0, 1, 2] 900, [2, 3] 800


@pytest.mark.parametrize("device", DEVICES)
def test_runner_device_path_and_batch_limit_give_the_cpu_path_predictions(runner, base_version, device):
    images = [c for name, c in _photo_jpegs().items() if name not in ("over-the-limit",)]
    images += [encode(im, "JPEG", quality=92) for im in formula_images(12, 96, seed=7)[0]]
    cpu = runner.run(images)
    on_device = Runner(base_version, device=device, decode_on_device=True, max_batch=5).run(images)
    assert on_device.error_codes.tolist() == cpu.error_codes.tolist()
    assert on_device.error_messages == cpu.error_messages
    ok = cpu.error_codes == 0
    assert ok.sum() == len(images) - 3
    assert (on_device.probabilities[ok].argmax(1) == cpu.probabilities[ok].argmax(1)).mean() >= 0.9
    # On a GPU the network runs in fp16 and nvJPEG has its own IDCT: an H200 differed by up to 0.25.
    assert np.abs(on_device.probabilities - cpu.probabilities).max() < (0.1 if device == "cpu" else 0.3)
    # Three at a time, so one block holds only the three unusable images: the same answers as one batch.
    chunked = Runner(base_version, max_batch=3).run(images)
    assert chunked.error_codes.tolist() == cpu.error_codes.tolist() and chunked.error_messages == cpu.error_messages
    np.testing.assert_allclose(chunked.probabilities, cpu.probabilities, atol=1e-5)
    np.testing.assert_allclose(chunked.embeddings, cpu.embeddings, atol=1e-4)

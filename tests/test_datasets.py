"""The dataset store on a real directory: content addressing, appends, relabels, snapshots, refusals."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from prelabel.datasets import shapes
from prelabel.datasets.store import DatasetStore, Limits
from prelabel.errors import InvalidArgument, NotFound, ResourceExhausted
from tests.conftest import encode


def image(seed: int, fmt: str = "PNG") -> bytes:
    return encode(shapes.render(seed % 3, 32, np.random.default_rng(seed)), fmt)


def add(store: DatasetStore, name: str, examples: list[tuple[bytes, str]], replace: bool = False):
    upload = store.upload(name, replace)
    upload.add([(str(i), content, label) for i, (content, label) in enumerate(examples)])
    return upload.commit()


def blobs(store: DatasetStore) -> list[str]:
    return sorted(p.name for p in (store.root / ".blobs").rglob("*") if p.is_file())


def test_upload_appends_and_stores_each_image_once(tmp_path):
    store = DatasetStore(tmp_path)
    a, b, c = image(1), image(2, "JPEG"), image(3, "WEBP")
    info = add(store, "birds", [(a, "robin"), (b, "wren")])
    assert (info.name, info.example_count, info.class_counts, info.revision) == ("birds", 2, {"robin": 1, "wren": 1}, 2)
    assert info.created_at > 0 and info.updated_at >= info.created_at

    again = add(store, "birds", [(c, "wren")])  # appends
    assert again.example_count == 3 and again.class_counts == {"robin": 1, "wren": 2}
    assert again.created_at == info.created_at

    add(store, "other", [(a, "robin"), (c, "wren")])  # the same images in another dataset: no new files
    assert len(blobs(store)) == 3
    assert [i.name for i in store.all()] == ["birds", "other"]
    images, labels = store.examples("birds")
    assert images == [a, b, c] and labels == ["robin", "wren", "wren"]


def test_an_image_sent_again_is_relabelled_not_counted_twice(tmp_path):
    store = DatasetStore(tmp_path)
    a, b = image(1), image(2)
    add(store, "d", [(a, "cat"), (b, "dog")])
    info = add(store, "d", [(a, "dog")])
    assert info.example_count == 2 and info.class_counts == {"dog": 2}


def test_a_replacing_upload_makes_the_dataset_exactly_what_it_sends(tmp_path):
    store = DatasetStore(tmp_path)
    a, b, c = image(1), image(2), image(3)
    first = add(store, "d", [(a, "cat"), (b, "dog")])
    info = add(store, "d", [(b, "cat"), (c, "dog")], replace=True)  # a deleted, b relabelled, c new
    assert info.example_count == 2 and info.class_counts == {"cat": 1, "dog": 1}
    assert store.examples("d") == ([b, c], ["cat", "dog"])
    assert store.snapshot("d", first.revision) == store.snapshot("d", 2)  # a job's snapshot is unchanged
    assert len(store.snapshot("d", first.revision)) == 2
    again = add(store, "d", [(a, "cat")])  # a removed image can come back
    assert again.example_count == 3 and store.examples("d")[1] == ["cat", "dog", "cat"]


def test_a_snapshot_ignores_later_uploads(tmp_path):
    store = DatasetStore(tmp_path)
    first = add(store, "d", [(image(1), "cat"), (image(2), "dog")])
    add(store, "d", [(image(3), "cat"), (image(1), "dog")])
    assert list(store.snapshot("d", first.revision).values()) == ["cat", "dog"]
    assert len(store.snapshot("d")) == 3


def test_a_bad_example_is_named_by_index_and_nothing_is_added(tmp_path):
    store = DatasetStore(tmp_path, Limits(max_image_bytes=500_000, max_image_pixels=100_000, max_examples=4))
    add(store, "d", [(image(1), "cat")])
    upload = store.upload("d")
    upload.add([("x", image(2), "cat")])
    with pytest.raises(InvalidArgument, match=r"example 1 \(image id 'broken'\): the image could not be decoded"):
        upload.add([("broken", b"\x89PNG not really", "cat")])
    assert store.info("d").example_count == 1  # the upload was never committed

    for bad in ("", "a\tb", "x" * 200, "new\nline"):
        with pytest.raises(InvalidArgument, match=r"label .* is not valid"):
            store.upload("d").add([("", image(3), bad)])
    with pytest.raises(ResourceExhausted, match="PRELABEL_MAX_IMAGE_BYTES"):
        store.upload("d").add([("", b"\0" * 600_000, "cat")])
    big = encode(shapes.render(0, 400, np.random.default_rng(0)), "PNG")
    with pytest.raises(ResourceExhausted, match="PRELABEL_MAX_IMAGE_PIXELS"):
        store.upload("d").add([("", big, "cat")])
    with pytest.raises(ResourceExhausted, match="PRELABEL_MAX_EXAMPLES_PER_DATASET"):
        add(store, "d", [(image(s), "cat") for s in range(10, 15)])
    with pytest.raises(InvalidArgument, match="had no examples"):
        store.upload("d").commit()
    assert store.info("d").example_count == 1


@pytest.mark.parametrize("name", ["../escape", "a/b", ".blobs", "", "UPPER", "x" * 64, "a..b"])
def test_names_cannot_leave_the_store(tmp_path, name):
    store = DatasetStore(tmp_path / "datasets")
    with pytest.raises(InvalidArgument, match="dataset name"):
        store.upload(name)
    with pytest.raises(InvalidArgument, match="dataset name"):
        store.info(name)
    assert not (tmp_path / "escape").exists()


def test_unknown_dataset_is_not_found(tmp_path):
    with pytest.raises(NotFound, match="upload examples to it"):
        DatasetStore(tmp_path).info("nothing-here")


# An upload whose process dies after its log lines are fsynced and before summary.json is renamed.
DIES_BEFORE_THE_SUMMARY = """
import os, sys
from pathlib import Path
import prelabel.datasets.store as store

real = store.write_atomically
def write_atomically(path, data):
    if Path(path).name == "summary.json" and os.environ.get("DIE"):
        os._exit(9)
    real(path, data)
store.write_atomically = write_atomically
os.environ["DIE"] = ""
s = store.DatasetStore(Path(sys.argv[1]))
first = s.upload("birds")
first.add([("a", bytes.fromhex(sys.argv[2]), "robin"), ("b", bytes.fromhex(sys.argv[3]), "wren")])
first.commit()
os.environ["DIE"] = "1"
second = s.upload("birds")
second.add([("c", bytes.fromhex(sys.argv[4]), "wren")])
second.commit()
"""


def test_a_crash_between_log_and_summary_loses_no_later_upload(tmp_path):
    a, b, c, d = image(1), image(2), image(3), image(4)
    died = subprocess.run([sys.executable, "-c", DIES_BEFORE_THE_SUMMARY, str(tmp_path), a.hex(), b.hex(), c.hex()])
    assert died.returncode == 9
    store = DatasetStore(tmp_path)
    assert store.info("birds").class_counts == {"robin": 1, "wren": 1}  # the dead upload is not there
    assert len((tmp_path / "birds" / "examples.tsv").read_text().splitlines()) == 3  # but its line is
    info = add(store, "birds", [(d, "sparrow")])
    assert info.class_counts == {"robin": 1, "sparrow": 1, "wren": 1} and info.revision == 3
    assert sorted(store.snapshot("birds").values()) == ["robin", "sparrow", "wren"]  # as the summary says


def test_folders_leave_out_what_tools_leave_beside_the_images(tmp_path):
    """A folder zipped on a Mac holds ``__MACOSX/`` and ``._photo.jpg`` resource forks (not images);
    Jupyter leaves ``.ipynb_checkpoints``. None of them is an image or a class."""
    from prelabel.datasets.folder import images_under, labelled_files

    files = {"cat/1.png": image(1), "cat/._1.png": b"\0\5\x16\7 resource fork", "cat/.hidden/2.png": image(2),
             "dog/1.jpg": image(3, "JPEG"), "dog/sub/2.JPG": image(4, "JPEG"), ".ipynb_checkpoints/cat/3.png": image(5),
             "__MACOSX/cat/._1.png": b"\0\5\x16\7", "dog/notes.txt": b"not an image"}  # fmt: skip
    for name, content in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(content)
    found = [(str(p.relative_to(tmp_path)), label) for p, label in labelled_files(tmp_path)]
    assert found == [("cat/1.png", "cat"), ("dog/1.jpg", "dog"), ("dog/sub/2.JPG", "dog")]
    assert [str(p.relative_to(tmp_path)) for p in images_under(tmp_path)] == ["cat/1.png", "dog/1.jpg", "dog/sub/2.JPG"]
    hidden_root = tmp_path / ".data"  # a folder that is itself hidden is still read when named
    (hidden_root / "cat").mkdir(parents=True)
    (hidden_root / "cat" / "1.png").write_bytes(image(6))
    assert [p.name for p in images_under(hidden_root)] == ["1.png"]

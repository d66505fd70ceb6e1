"""The Triton model repository: names, configs, atomic numbered versions, cards."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from prelabel.errors import InvalidArgument, NotFound
from prelabel.models.card import VersionCard
from prelabel.names import validate_name
from prelabel.preprocessing import Preprocess
from prelabel.settings import Settings
from prelabel.triton.repository import ModelRepository, RepositoryConfig, default_instance_count, repository_for


def card(**kw: object) -> VersionCard:
    return VersionCard(arch="resnet18", labels=["cat", "dog"], preprocess=Preprocess(64, 64), **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["", "../etc", "a/b", "UPPER", ".hidden", "x" * 64, "a..b", "fznl\n", "ok\n\n"])
def test_invalid_names(name):
    with pytest.raises(InvalidArgument, match="not valid"):
        validate_name(name)


def test_versions_are_numbered_written_whole_and_described(tmp_path):
    repo = ModelRepository(tmp_path / "models", RepositoryConfig(max_batch_size=16, instance_kind="KIND_CPU"))
    assert repo.models() == [] and repo.versions("pets") == []
    v1 = repo.add_version("pets", card(metrics={"accuracy": 0.9}), lambda d: (d / "weights.pt").write_bytes(b"w1"))
    v2 = repo.add_version(
        "pets", card(strategy="STRATEGY_FULL_FINE_TUNE"), lambda d: (d / "weights.pt").write_bytes(b"w2")
    )
    assert (v1, v2) == (1, 2) and repo.versions("pets") == [1, 2] and repo.models() == ["pets"]
    assert (repo.version_dir("pets", 2) / "weights.pt").read_bytes() == b"w2"
    assert "prelabel.triton.backend.model" in (repo.version_dir("pets", 1) / "model.py").read_text()
    config = (tmp_path / "models" / "pets" / "config.pbtxt").read_text()
    for expected in ('backend: "python"', "max_batch_size: 16", "dynamic_batching", "kind: KIND_CPU",
                     "version_policy: { latest { num_versions: 2 } }"):  # fmt: skip
        assert expected in config
    assert repo.card("pets", 1).metrics == {"accuracy": 0.9}
    assert repo.card("pets", 2).strategy == "STRATEGY_FULL_FINE_TUNE"
    with pytest.raises(NotFound):
        repo.card("pets", 3)
    assert not list((tmp_path / ".models.staging").iterdir())


def test_a_failed_write_leaves_no_version(tmp_path):
    repo = ModelRepository(tmp_path / "models")

    def broken(folder):
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        repo.add_version("pets", card(), broken)
    assert repo.versions("pets") == []


def test_concurrent_writers_get_distinct_versions(tmp_path):
    repo = ModelRepository(tmp_path / "models")
    results: list[int] = []
    threads = [
        threading.Thread(target=lambda: results.append(repo.add_version("pets", card(), lambda d: None)))
        for _ in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == list(range(1, 9))


def test_a_stray_version_folder_is_skipped_with_a_warning_not_a_spin(tmp_path, caplog):
    """A numbered folder without card.json (copied in by hand, say) used to make add_version retry forever."""
    repo = ModelRepository(tmp_path)
    assert repo.add_version("m", card(), lambda folder: None) == 1
    (tmp_path / "m" / "2").mkdir()
    (tmp_path / "m" / "²").mkdir()  # str.isdigit() says yes; int() says no
    done = threading.Event()
    published: list[int] = []

    def publish() -> None:
        published.append(repo.add_version("m", card(), lambda f: None))
        done.set()

    threading.Thread(target=publish, daemon=True).start()
    assert done.wait(10), "add_version spun on the stray folder"
    assert published == [3] and repo.versions("m") == [1, 3]
    assert "hold no card.json" in caplog.text and "[2]" in caplog.text


def test_configs_from_an_older_release_are_rewritten_at_start(tmp_path):
    """Images travel as IMAGES + SIZES (UINT8, INT64) now, once as one BYTES tensor IMAGE per image."""
    repo = ModelRepository(tmp_path)
    repo.add_version("m", card(), lambda folder: None)
    config = tmp_path / "m" / "config.pbtxt"
    current = config.read_text()
    old = current[: current.index("input [")] + 'input [\n  { name: "IMAGE", data_type: TYPE_STRING, dims: [ 1 ] }\n]\n'
    config.write_text(old)
    repo.write_configs()
    text = config.read_text()
    assert text == current
    assert '"IMAGES", data_type: TYPE_UINT8' in text and '"SIZES", data_type: TYPE_INT64' in text
    assert "TYPE_STRING" not in text  # no BYTES tensor: numpy 2 breaks them in Triton 2.51's python backend


def test_instance_and_batching_settings_reach_every_model_at_start(tmp_path, caplog):
    ModelRepository(tmp_path).add_version("m", card(), lambda folder: None)
    ModelRepository(tmp_path).add_version("n", card(), lambda folder: None)
    assert "version_policy: { latest { num_versions: 2 } }" in (tmp_path / "m" / "config.pbtxt").read_text()
    changed = ModelRepository(tmp_path, RepositoryConfig(max_batch_size=64, instance_count=3, instance_kind="KIND_GPU",
                                                         max_queue_delay_us=500, loaded_versions=3))  # fmt: skip
    with caplog.at_level("INFO", "prelabel.repository"):
        changed.write_configs()
    for name in ("m", "n"):
        text = (tmp_path / name / "config.pbtxt").read_text()
        assert "max_batch_size: 64" in text and "count: 3, kind: KIND_GPU" in text and ": 500" in text
        assert "version_policy: { latest { num_versions: 3 } }" in text
        assert f"model {name}: config.pbtxt rewritten: 3 x KIND_GPU, max batch 64, queue delay 500 us, the newest 3 " \
               "version(s) loaded" in caplog.text  # fmt: skip
    caplog.clear()
    changed.write_configs()  # nothing changed: nothing written, nothing logged
    assert "rewritten" not in caplog.text
    ModelRepository(tmp_path, RepositoryConfig(loaded_versions=0)).write_configs()  # 0: every version, as before
    assert "version_policy: { all { } }" in (tmp_path / "m" / "config.pbtxt").read_text()


def test_card_round_trip_ignores_unknown_fields():
    c = card(auto_accept_threshold=0.8, temperature=1.5)
    text = c.to_json().replace('"arch"', '"future_field": 1, "arch"')
    assert VersionCard.from_json(text) == VersionCard.from_json(c.to_json())
    assert VersionCard.from_json(text).auto_accept_threshold == 0.8


async def test_catalog_finds_versions_published_after_its_last_refresh(tmp_path):
    from prelabel.errors import Unavailable
    from prelabel.gateway.catalog import ModelCatalog
    from prelabel.triton.client import TritonClient

    repo = ModelRepository(tmp_path / "models")
    repo.add_version("pets", card(), lambda d: None)
    catalog = ModelCatalog(repo, TritonClient("127.0.0.1:9"), "pets")
    await catalog.refresh()  # Triton unreachable: nothing is ready, but versions are known
    assert catalog.versions == {"pets": [1]} and not catalog.triton_up
    repo.add_version("pets", card(), lambda d: None)
    repo.add_version("cats", card(), lambda d: None)
    catalog._reachable.up, catalog.ready = True, {"pets": {1}}
    # Found on disk though not ready: UNAVAILABLE (retry), not NOT_FOUND. A miss re-reads readiness
    # at once, which finds this Triton unreachable.
    with pytest.raises(Unavailable, match="retry shortly"):
        await catalog.resolve("pets", "2")
    assert catalog.versions["pets"] == [1, 2]
    with pytest.raises(Unavailable, match="retry shortly"):
        await catalog.resolve("cats", "")
    with pytest.raises(NotFound, match="model 'dogs' does not exist; models: cats, pets"):
        await catalog.resolve("dogs", "")
    assert "dogs" not in catalog.versions
    await catalog.triton.close()


def test_instance_count_defaults_to_several_per_gpu_and_one_on_the_cpu(tmp_path):
    no_gpu, gpus = tmp_path / "none", tmp_path / "gpus"
    (gpus / "0000:01:00.0").mkdir(parents=True)
    assert default_instance_count("KIND_AUTO", no_gpu) == 1
    assert default_instance_count("KIND_AUTO", gpus) == 4 and default_instance_count("KIND_GPU", gpus) == 4
    assert default_instance_count("KIND_CPU", gpus) == 1
    here = 2 if Path("/proc/driver/nvidia/gpus").is_dir() else 1
    assert repository_for(Settings(data_dir=tmp_path)).config.instance_count == here
    assert repository_for(Settings(data_dir=tmp_path, triton_instance_count=3)).config.instance_count == 3


def test_version_numbers_are_never_reused_after_a_rollback(tmp_path):
    """docs/operations.md rolls back by moving the newest version out; the next fine-tune must not
    take its number: Label Studio keeps predictions of ``pets@3`` and asks again only for a new version."""
    repo = ModelRepository(tmp_path / "models")
    for _ in range(3):
        repo.add_version("pets", card(), lambda d: None)
    (tmp_path / "retired").mkdir()
    (tmp_path / "models" / "pets" / "3").rename(tmp_path / "retired" / "pets-3")
    assert repo.versions("pets") == [1, 2]
    assert repo.add_version("pets", card(), lambda d: None) == 4 and repo.versions("pets") == [1, 2, 4]
    (tmp_path / "models" / "pets" / ".last-version").unlink()  # a repository from an older release: as before
    assert repo.add_version("pets", card(), lambda d: None) == 5


def test_a_config_another_user_owns_is_left_as_it_is_and_said_so(tmp_path, caplog, monkeypatch):
    """``prelabel init`` in Triton's pod rewrites every config at start; one that a trainer running as
    another user wrote cannot be rewritten: say what to do, and let Triton start with the old one."""
    repo = ModelRepository(tmp_path, RepositoryConfig(max_batch_size=8))
    repo.add_version("mine", card(), lambda folder: None)
    repo.add_version("theirs", card(), lambda folder: None)
    other = ModelRepository(tmp_path, RepositoryConfig(max_batch_size=16))
    real = other._write_config

    def write(name: str) -> bool:
        if name == "theirs":
            raise PermissionError(13, "Permission denied", str(tmp_path / name))
        return real(name)

    monkeypatch.setattr(other, "_write_config", write)
    with caplog.at_level("INFO", "prelabel.repository"):
        other.write_configs()
    assert "max_batch_size: 16" in (tmp_path / "mine" / "config.pbtxt").read_text()
    assert "max_batch_size: 8" in (tmp_path / "theirs" / "config.pbtxt").read_text()
    assert "model theirs: cannot rewrite config.pbtxt ([Errno 13] Permission denied" in caplog.text
    assert "Run every process that writes the repository as one user" in caplog.text

"""The one settings object: environment variables, flags, defaults."""

from __future__ import annotations

from pathlib import Path

import pytest

from prelabel.errors import InvalidArgument
from prelabel.settings import Settings


def test_environment_then_flags():
    env = {"PRELABEL_GRPC_PORT": "6000", "PRELABEL_DATA_DIR": "/srv/prelabel", "PRELABEL_MAX_IMAGE_PIXELS": "10"}
    s = Settings.from_env(env, grpc_port=7000, metrics_port=None)
    assert s.grpc_port == 7000 and s.metrics_port == 9400 and s.max_image_pixels == 10
    assert s.data_dir == Path("/srv/prelabel") and s.repository == Path("/srv/prelabel/models")
    assert s.embedded_triton and not Settings.from_env({"PRELABEL_TRITON_URL": "triton:8001"}).embedded_triton


def test_bad_values_name_the_variable():
    with pytest.raises(InvalidArgument, match="PRELABEL_GRPC_PORT='http'"):
        Settings.from_env({"PRELABEL_GRPC_PORT": "http"})


def test_env_table_lists_every_setting():
    table = dict(Settings.env_table())
    assert table["PRELABEL_MAX_IMAGES_PER_REQUEST"] == "256"
    assert len(table) == len(Settings.__dataclass_fields__)


def test_configuration_doc_names_every_setting():
    text = (Path(__file__).resolve().parent.parent / "docs" / "operations.md").read_text()
    missing = [var for var, _ in Settings.env_table() if f"`{var}`" not in text]
    assert not missing, f"docs/operations.md lacks {missing}"


def test_cli_batches_by_count_and_bytes(tmp_path):
    from prelabel.cli.client import batched

    sizes = [10, 10, 10, 50, 200, 10, 10]
    files = []
    for i, n in enumerate(sizes):
        (tmp_path / f"{i}.jpg").write_bytes(b"x" * n)
        files.append(tmp_path / f"{i}.jpg")
    groups = [[int(p.stem) for p in b] for b in batched(files, count=3, max_bytes=100)]
    assert groups == [[0, 1, 2], [3], [4], [5, 6]]  # 200 > 100 travels alone; order is kept

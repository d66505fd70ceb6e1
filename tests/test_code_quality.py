"""ruff and mypy --strict on our own modules: the style the project holds itself to."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def test_ruff_is_clean():
    run = subprocess.run(
        [str(BIN / "ruff"), "check", "services", "tests", "bench", "scripts"], cwd=ROOT, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stdout + run.stderr


def test_ruff_format_leaves_everything_as_it_is():
    """One layout for everyone: `ruff format` (a compact layout it would undo is kept with `# fmt: skip`)."""
    paths = ["services", "tests", "bench", "scripts"]
    run = subprocess.run([str(BIN / "ruff"), "format", "--check", *paths], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr + "\nrun: .venv/bin/ruff format services tests bench scripts"


def test_mypy_strict_is_clean():
    run = subprocess.run([str(BIN / "mypy"), "--strict"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr


def package_imports() -> dict[str, set[str]]:
    """Which of our packages each of our packages imports (module level and inside functions alike)."""
    import ast

    source = ROOT / "services" / "prelabel"
    graph: dict[str, set[str]] = {}
    for path in source.rglob("*.py"):
        parts = path.relative_to(source).parts
        package = parts[0] if len(parts) > 1 else path.stem
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("prelabel."):
                target = node.module.split(".")[1]
                if target != package:
                    graph.setdefault(package, set()).add(target)
    return graph


def test_domain_packages_do_not_depend_on_the_serving_layer():
    """models/, datasets/ and training/ hold the domain; triton/ serves it. Cards and names live with
    the domain (models/card.py, names.py), so the triton <-> models package cycle is gone."""
    graph = package_imports()
    assert "triton" not in graph.get("models", set()) | graph.get("datasets", set())
    for domain in ("models", "datasets", "training"):
        assert "gateway" not in graph.get(domain, set()), domain


def test_the_label_studio_adapter_is_only_a_client_of_the_gateway():
    """It scales apart from Triton: no model, no Triton client, no torch in its process."""
    reaches = package_imports().get("labelstudio", set())
    assert not reaches & {"gateway", "triton", "models", "training", "queue"}, reaches
    run = subprocess.run([sys.executable, "-c", "import sys, prelabel.labelstudio.server as s; "
                          "print(sorted(m for m in ('torch', 'tritonclient') if m in sys.modules))"],
                         capture_output=True, text=True, check=True)  # fmt: skip
    assert run.stdout.strip() == "[]"


def test_finding_the_triton_binary_imports_no_pytriton():
    """PyTriton's import pulls its client (gevent, zmq...) into the launcher; its folder is enough."""
    run = subprocess.run([sys.executable, "-c", "import sys; from prelabel.triton.supervisor import TritonPaths; "
                          "assert TritonPaths.from_wheel().binary.is_file(); "
                          "print(sorted(m for m in ('pytriton', 'gevent', 'zmq') if m in sys.modules))"],
                         capture_output=True, text=True, check=True)  # fmt: skip
    assert run.stdout.strip() == "[]"

"""A real Label Studio for tests: started offline on a free loopback port, driven through its REST API.

CI installs ``label-studio`` into ``.venv-labelstudio`` (scripts/setup.sh --test); the start
options are the ones ``../shared/LABEL_STUDIO.md`` found necessary offline and on loopback.
"""

from __future__ import annotations

import atexit
import json
import os
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
LABEL_STUDIO = ROOT / ".venv-labelstudio" / "bin" / "label-studio"
EMAIL = "annotator@example.com"
PASSWORD = "prelabel-test-password"


@dataclass
class LabelStudio:
    url: str
    token: str
    process: subprocess.Popen[bytes]
    log_path: Path

    @classmethod
    def start(cls, data_dir: Path, port: int, timeout: float = 180) -> LabelStudio:
        studio = cls.launch(data_dir, port)
        studio.wait_ready(timeout)
        return studio

    @classmethod
    def launch(cls, data_dir: Path, port: int) -> LabelStudio:
        if not LABEL_STUDIO.is_file():
            raise RuntimeError(f"{LABEL_STUDIO} is missing: run scripts/setup.sh --test")
        token = uuid.uuid4().hex
        url = f"http://127.0.0.1:{port}"
        env = {
            **os.environ,
            "LABEL_STUDIO_BASE_DATA_DIR": str(data_dir),
            "LABEL_STUDIO_HOST": url,
            "ML_BLOCK_LOCAL_IP": "false",
            "SSRF_PROTECTION_ENABLED": "false",
            "LATEST_VERSION_CHECK": "false",
            "COLLECT_ANALYTICS": "false",
        }
        log_path = data_dir / "label-studio.log"
        process = subprocess.Popen(
            [str(LABEL_STUDIO), "start", "--no-browser", "--internal-host", "127.0.0.1", "--port", str(port),
             "--username", EMAIL, "--password", PASSWORD, "--user-token", token, "--enable-legacy-api-token"],
            env=env, stdout=log_path.open("wb"), stderr=subprocess.STDOUT, cwd=data_dir,
        )  # fmt: skip
        studio = cls(url, token, process, log_path)
        atexit.register(studio.stop)  # an interrupted session leaves no Label Studio behind
        return studio

    def wait_ready(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"label-studio exited {self.process.returncode}:\n{self.log()}")
            try:
                self.call("GET", "/api/projects")
                return
            except (OSError, urllib.error.HTTPError):
                time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"Label Studio did not answer on {self.url} within {timeout} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def call(self, method: str, path: str, body: Any = None, timeout: float = 120) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.url + path, data=data, method=method, headers={
            "Authorization": f"Token {self.token}", "Content-Type": "application/json"})  # fmt: skip
        with urllib.request.urlopen(request, timeout=timeout) as response:
            raw = response.read()
        return json.loads(raw) if raw else None

    def upload(self, project: int, files: list[tuple[str, bytes]]) -> list[int]:
        """Import image files as tasks (multipart, one field per file); returns the new task ids in order."""
        boundary = uuid.uuid4().hex
        parts = []
        for i, (name, content) in enumerate(files):
            parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="file{i}"; filename="{name}"\r\n'
                         f"Content-Type: application/octet-stream\r\n\r\n".encode() + content + b"\r\n")  # fmt: skip
        body = b"".join(parts) + f"--{boundary}--\r\n".encode()
        headers = {"Authorization": f"Token {self.token}", "Content-Type": f"multipart/form-data; boundary={boundary}"}
        request = urllib.request.Request(f"{self.url}/api/projects/{project}/import", data=body, method="POST",
                                         headers=headers)  # fmt: skip
        with urllib.request.urlopen(request, timeout=120) as response:
            json.loads(response.read())
        tasks = self.tasks(project)
        by_name = {t["data"]["image"].rsplit("/", 1)[-1].split("-", 1)[-1]: t["id"] for t in tasks}
        return [by_name[name] for name, _ in files]

    def tasks(self, project: int) -> list[dict[str, Any]]:
        page = self.call("GET", f"/api/tasks?project={project}&page_size=1000&fields=all")
        return list(page["tasks"] if isinstance(page, dict) else page)

    def task(self, task: int) -> dict[str, Any]:
        return dict(self.call("GET", f"/api/tasks/{task}"))

    def retrieve_predictions(self, project: int) -> None:
        self.call("POST", f"/api/dm/actions?id=retrieve_tasks_predictions&project={project}",
                  {"selectedItems": {"all": True, "excluded": []}})  # fmt: skip


_early: LabelStudio | None = None


def start_early() -> None:
    """Launch Label Studio when the session starts (its first start takes half a minute of database
    set-up), so that it gets ready while the tests before test_labelstudio.py run."""
    global _early
    from tests.stack import free_port

    _early = LabelStudio.launch(Path(tempfile.mkdtemp(prefix="label-studio-")), free_port())


def started() -> LabelStudio:
    """The Label Studio launched early, or a new one; ready."""
    global _early
    from tests.stack import free_port

    studio, _early = _early or LabelStudio.launch(Path(tempfile.mkdtemp(prefix="label-studio-")), free_port()), None
    studio.wait_ready()
    return studio

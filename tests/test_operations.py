"""What operators deploy and watch: metrics (promtool), alert rules, the dashboard, the Dockerfile and
the wheel it installs (hadolint, a real build of that stage's step), the Kubernetes overlays
(kubectl kustomize, kubernetes-validate)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.request
import zipfile
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from prelabel.settings import Settings
from prelabel.triton.supervisor import TritonSupervisor
from prelabel.v1 import prelabel_pb2 as pb
from prelabel.v1 import prelabel_pb2_grpc as rpc
from tests.conftest import promtool
from tests.stack import METRICS, PRELABEL, Process, environment

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
PROMTOOL_LINT_PROBLEMS = 3  # promtool's exit code when metrics parse but break naming conventions


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return str(response.read().decode())


def names(text: str) -> set[str]:
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}


@pytest.fixture(scope="module")
def exposition(stack, channel, tmp_path_factory) -> dict[str, str]:
    """/metrics of each kind of process: the gateway (with its queue and models), a trainer, Triton."""
    rpc.ModelServiceStub(channel).ListModels(pb.ListModelsRequest(), timeout=30)  # at least one call timed
    trainer = Process(["trainer"], environment(tmp_path_factory.mktemp("trainer"), metrics_port=0)).start()
    try:
        url = f"http://127.0.0.1:{trainer.wait_for_line(METRICS, timeout=120).group(1)}/metrics"
        texts = {"trainer": scrape(url)}
    finally:
        trainer.stop()
    assert stack.metrics_url and stack.triton_metrics_url
    return {**texts, "gateway": scrape(stack.metrics_url), "triton": scrape(stack.triton_metrics_url)}


@pytest.mark.stack
def test_promtool_accepts_every_process_metrics(exposition):
    for part in ("gateway", "trainer"):
        checked = promtool("check", "metrics", text=exposition[part])
        assert checked.returncode == 0, f"{part}: {checked.stdout}{checked.stderr}"
    gateway = exposition["gateway"]
    for metric in ("prelabel_queue_jobs", "prelabel_queue_oldest_queued_age_seconds", "prelabel_model_versions",
                   "prelabel_triton_up", "prelabel_grpc_request_duration_seconds_bucket"):  # fmt: skip
        assert metric in names(gateway), metric
    assert 'prelabel_model_versions{model="prelabel-base"}' in gateway
    # `serve`'s trainer reports through the gateway's /metrics (it has no port of its own): one series per
    # trainer process, and each family declared once (promtool above refuses a repeated one).
    assert re.search(r'^prelabel_trainer_busy\{pid="\d+"\} [01]\.0$', gateway, re.M), gateway
    assert "prelabel_training_steps_total" in names(gateway)  # labelled ones appear with their first sample
    assert len(re.findall(r"^# TYPE prelabel_trainer_busy gauge$", gateway, re.M)) == 1
    assert "prelabel_trainer_busy" in names(exposition["trainer"])
    # Each process only what it measures: a trainer's idle prelabel_triton_up 0 drew a Triton that is down
    assert not {n for n in names(exposition["trainer"]) if n.startswith(("prelabel_triton", "prelabel_grpc"))}
    assert not {n for n in names(gateway) if n.startswith("prelabel_labelstudio")}
    # A labelled counter has no samples before its first job ends; its declaration is there from the start.
    assert re.search(r"^# TYPE prelabel_jobs_ended(_total)? counter$", exposition["trainer"], re.M)
    # Triton's own names break Prometheus conventions (nv_*_us counters without _total): it must
    # still parse, and every finding must be about Triton's metrics, never ours.
    triton = promtool("check", "metrics", text=exposition["triton"])
    assert triton.returncode in (0, PROMTOOL_LINT_PROBLEMS), triton.stderr
    assert all(line.startswith("nv_") for line in (triton.stdout + triton.stderr).splitlines() if line.strip())


def listening_addresses(port: int) -> set[str]:
    """The local addresses with a listening TCP socket on ``port`` (from /proc/net/tcp)."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, hex_port = local.split(":")
        if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
            found.add(".".join(str(int(address[i : i + 2], 16)) for i in (6, 4, 2, 0)))
    return found


@pytest.mark.stack
def test_metrics_listen_where_grpc_listens(stack):
    """/metrics used to bind 0.0.0.0 while gRPC defaulted to loopback."""
    assert stack.metrics_url
    port = int(stack.metrics_url.rsplit(":", 1)[1].split("/")[0])
    assert listening_addresses(port) == {"127.0.0.1"}
    assert Settings(grpc_host="0.0.0.0").metrics_address == "0.0.0.0"
    assert Settings(grpc_host="0.0.0.0", metrics_host="10.0.0.5").metrics_address == "10.0.0.5"


@pytest.mark.stack
def test_alerts_and_dashboard_only_use_metrics_that_exist(exposition):
    declared = {m.group(1) for t in exposition.values() for m in re.finditer(r"^# TYPE (\S+) ", t, re.M)}
    exported = set().union(declared, *(names(t) for t in exposition.values()))  # declared: even with no sample yet
    rules = (DEPLOY / "prometheus" / "alerts.yml").read_text()
    dashboard = json.loads((DEPLOY / "grafana" / "prelabel-dashboard.json").read_text())
    queries = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    used = set(re.findall(r"\b(?:prelabel|nv)_[a-z_]+", rules + "\n".join(queries)))
    used = {u.removesuffix("_bucket") for u in used}
    unknown = sorted(u for u in used if u not in exported)
    assert not unknown, f"alerts or dashboard refer to metrics nobody exports: {unknown}"
    for must in ("prelabel_grpc_requests_total", "prelabel_queue_jobs", "prelabel_triton_up"):
        assert must in used  # golden signals of each part are on the dashboard


def test_alert_rules_pass_promtool_and_their_unit_tests():
    folder = DEPLOY / "prometheus"
    checked = promtool("check", "rules", "alerts.yml", cwd=folder)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = promtool("test", "rules", "alerts_test.yml", cwd=folder)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    alerts = {r["alert"] for g in yaml.safe_load((folder / "alerts.yml").read_text())["groups"] for r in g["rules"]}
    assert {"PrelabelGatewayErrorRate", "PrelabelPredictLatencyP99", "PrelabelTritonDown", "PrelabelQueueBacklogOld",
            "PrelabelJobFailureRate", "PrelabelTrainerStuck", "PrelabelDataVolumeFull"} <= alerts  # fmt: skip
    runbook = (ROOT / "docs" / "operations.md").read_text()
    assert all(f"### {name}" in runbook for name in alerts), "every alert needs its runbook section"


def dockerfile_stages() -> dict[str, list[str]]:
    stages: dict[str, list[str]] = {}
    current = ""
    logical = re.sub(r"\\\n\s*", "", (ROOT / "Dockerfile").read_text())
    for line in logical.splitlines():
        if m := re.match(r"FROM \S+ AS (\w+)", line):
            current = m.group(1)
            stages[current] = []
        elif current and line.strip() and not line.startswith("#"):
            stages[current].append(line.strip())
    return stages


def test_dockerfile_passes_hadolint_and_builds_the_images_it_promises():
    hadolint = Path(sys.executable).parent / "hadolint"
    linted = subprocess.run([str(hadolint), str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert linted.returncode == 0, linted.stdout + linted.stderr
    stages = dockerfile_stages()
    assert set(stages) == {"wheel", "service", "triton"}
    service, triton = "\n".join(stages["service"]), "\n".join(stages["triton"])
    assert "USER 10001" in service and "HEALTHCHECK" in service and 'CMD ["prelabel", "health"]' in service
    assert '"${TORCH_INDEX}"' in service and '"${TORCH_INDEX}"' in triton  # CPU/GPU torch by build argument
    assert "USER 10001" in triton and "HEALTHCHECK" in triton and "pip install" in triton  # the service's user


def test_the_wheel_stage_builds_a_wheel_with_code_model_and_generated_api(tmp_path):
    (step,) = [s for s in dockerfile_stages()["wheel"] if s.startswith("RUN ")]
    command = step.removeprefix("RUN ").replace("/wheels", str(tmp_path)).split()
    assert command[:2] == ["pip", "wheel"]
    built = subprocess.run([sys.executable, "-m", *command], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-2000:]
    (wheel,) = tmp_path.glob("prelabel-*.whl")
    files = zipfile.ZipFile(wheel).namelist()
    for expected in ("prelabel/v1/prelabel_pb2.py", "prelabel/v1/prelabel_pb2_grpc.py",
                     "prelabel/triton/backend/model.py", "prelabel/cli/main.py", "prelabel/py.typed"):  # fmt: skip
        assert expected in files, expected
    assert any(f.startswith("prelabel/models/assets/") for f in files)
    metadata = zipfile.ZipFile(wheel).read(next(f for f in files if f.endswith("METADATA"))).decode()
    assert "Requires-Dist: nvidia-pytriton" in metadata and 'extra == "embedded"' in metadata  # not in images


def kubectl() -> str:
    tool = shutil.which("kubectl")
    assert tool, "kubectl is missing: scripts/setup.sh --test installs Debian's kubernetes-client"
    return tool


def render(overlay: str) -> list[dict]:
    out = subprocess.run([kubectl(), "kustomize", str(DEPLOY / "kubernetes" / "overlays" / overlay)],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


CUSTOM = {("monitoring.coreos.com/v1", "ServiceMonitor"), ("keda.sh/v1alpha1", "ScaledObject")}


@pytest.mark.parametrize("overlay", ["cpu", "gpu"])
def test_kubernetes_overlays_render_valid_objects(overlay):
    objects = render(overlay)
    by_kind: dict[tuple[str, str], dict] = {(o["kind"], o["metadata"]["name"]): o for o in objects}
    for o in objects:
        if (o["apiVersion"], o["kind"]) in CUSTOM:
            assert o["spec"], o  # CRDs: no schema here; their fields are checked below
            continue
        kubernetes_validate.validate(o, kubernetes_validate.latest_version(), strict=True)
        assert o["metadata"].get("namespace") == "prelabel" or o["kind"] == "Namespace"

    for kind, name in [("Deployment", "gateway"), ("Service", "gateway"), ("HorizontalPodAutoscaler", "gateway"),
                       ("PodDisruptionBudget", "gateway"), ("Deployment", "triton"), ("Deployment", "trainer"),
                       ("ScaledObject", "trainer"), ("StatefulSet", "redis"),
                       ("PersistentVolumeClaim", "prelabel-data"), ("NetworkPolicy", "triton"),
                       ("ServiceMonitor", "prelabel-gateway"),
                       ("ServiceMonitor", "prelabel-trainer"), ("ServiceMonitor", "triton"),
                       ("Deployment", "labelstudio"), ("Service", "labelstudio"),
                       ("ServiceMonitor", "prelabel-labelstudio")]:  # fmt: skip
        assert (kind, name) in by_kind, (kind, name)
    assert any(k == "ConfigMap" and n.startswith("prelabel-settings") for k, n in by_kind)
    assert any(k == "Secret" and n.startswith("prelabel-tokens") for k, n in by_kind)

    pods = [o["spec"]["template"]["spec"] for o in objects if o["kind"] in ("Deployment", "StatefulSet")]
    for pod in pods:
        assert pod["securityContext"]["runAsNonRoot"] is True
        for c in pod.get("initContainers", []) + pod["containers"]:
            assert c["resources"]["requests"] and c["resources"]["limits"], c["name"]
    # Every pod on the data volume runs as one user: Triton's init container rewrites the configs that
    # trainers wrote, and each reads what the others wrote.
    on_volume = [p for p in pods if any(v.get("persistentVolumeClaim", {}).get("claimName") == "prelabel-data"
                                        for v in p.get("volumes", []))]  # fmt: skip
    assert len(on_volume) == 3  # gateway, trainer, Triton
    assert {(p["securityContext"]["runAsUser"], p["securityContext"]["fsGroup"]) for p in on_volume} == {(10001, 10001)}
    gateway = by_kind[("Deployment", "gateway")]["spec"]["template"]["spec"]["containers"][0]
    sources = [next(iter(s)) for s in gateway["envFrom"]]
    assert sources == ["configMapRef", "secretRef"]  # settings from a ConfigMap, credentials from a Secret
    assert gateway["readinessProbe"]["grpc"]["port"] == 50051 and gateway["startupProbe"]["grpc"]
    triton = by_kind[("Deployment", "triton")]["spec"]["template"]["spec"]
    shm = next(v for v in triton["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"]["medium"] == "Memory"
    gpus = triton["containers"][0]["resources"]["limits"].get("nvidia.com/gpu")
    assert (gpus == 1) if overlay == "gpu" else gpus is None
    policy = by_kind[("NetworkPolicy", "triton")]["spec"]["ingress"]
    inference = [rule for rule in policy if {"port": 8001, "protocol": "TCP"} in rule["ports"]]
    assert [r["from"] for r in inference] == [[{"podSelector": {"matchLabels": {"app.kubernetes.io/name":
                                                                               "prelabel-gateway"}}}]]  # fmt: skip
    scaled = by_kind[("ScaledObject", "trainer")]["spec"]
    assert (
        scaled["scaleTargetRef"]["name"] == "trainer"
        and "prelabel_queue_jobs" in scaled["triggers"][0]["metadata"]["query"]
    )


def test_every_triton_runs_without_config_auto_completion(tmp_path):
    """Prelabel writes every model config in full; auto-completion would start one more python stub per
    model load (importing torch) only to ask it for a config: half of each load (docs/operations.md).
    The embedded Triton, the image's CMD and both Kubernetes overlays switch it off; the integration
    tests prove that Triton loads the configs as written."""
    embedded = TritonSupervisor(tmp_path / "models", tmp_path, tmp_path / "url", tmp_path / "log").command()
    image = next(line for line in dockerfile_stages()["triton"] if line.startswith("CMD "))
    commands = [embedded, json.loads(image.removeprefix("CMD "))]
    for overlay in ("cpu", "gpu"):
        (triton,) = [o for o in render(overlay) if o["kind"] == "Deployment" and o["metadata"]["name"] == "triton"]
        commands.append(triton["spec"]["template"]["spec"]["containers"][0]["args"])
    for command in commands:
        assert "--disable-auto-complete-config" in command, command


NOBODY = 65534  # another user than the one who publishes, as Triton's pod may be


def test_another_user_can_read_all_that_triton_loads(tmp_path_factory):
    """Trainers, gateways and Triton may run as different users on one shared volume (Kubernetes pods,
    compose services). A version folder made by ``tempfile`` is 0700 and a config 0600, which Triton as
    another user cannot read: every model would fail to load. Here the repository is written by this
    process (``prelabel init`` publishes the default model as a trainer publishes versions) and another
    user reads every file in it. (The real Triton cannot run as another user on this machine: its
    Python lives under /root.)"""
    shared = Path(tempfile.mkdtemp(prefix="prelabel-shared-"))
    try:
        shared.chmod(0o755)
        init = subprocess.run([PRELABEL, "init"], env=environment(shared / "data"), capture_output=True, text=True,
                              timeout=300)  # fmt: skip
        assert init.returncode == 0, init.stderr
        files = sorted(str(p) for p in (shared / "data" / "models").rglob("*") if p.is_file())
        assert any(f.endswith("/1/weights.pt") for f in files) and any(f.endswith("/config.pbtxt") for f in files)
        setpriv = shutil.which("setpriv")
        assert setpriv, "setpriv (util-linux) is missing"
        read = subprocess.run([setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "cat", *files],
                              capture_output=True, timeout=60)  # fmt: skip
        assert read.returncode == 0, read.stderr.decode()
    finally:
        shutil.rmtree(shared, ignore_errors=True)


def test_a_data_directory_the_user_cannot_write_is_said_plainly(tmp_path):
    """A pod whose runAsUser/fsGroup do not match the volume: `prelabel init` (the init container) ended in
    a PermissionError traceback. It says what it could not write, as whom, and what to change."""
    tmp_path.chmod(0o755)  # readable by nobody, writable only by its owner (root)
    setpriv = shutil.which("setpriv")
    assert setpriv, "setpriv (util-linux) is missing"
    init = subprocess.run([setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", PRELABEL, "init"],
                          env=environment(tmp_path / "data"), capture_output=True, text=True, timeout=300)  # fmt: skip
    assert init.returncode == 1, init.stderr
    assert re.search(rf"^prelabel: cannot write {tmp_path / 'data'}\S* \(Permission denied\) as uid {NOBODY}: ",
                     init.stderr), init.stderr  # fmt: skip
    assert "Traceback" not in init.stderr

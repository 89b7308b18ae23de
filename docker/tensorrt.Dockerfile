# syntax=docker/dockerfile:1
# sfc on an x86-64 NVIDIA GPU with TensorRT: finishes a TensorRT build made where TensorRT is
# missing (`sfc build --from-qdq`) and benchmarks the engines (`sfc bench --device cuda`).
# Base: NGC TensorRT 25.01 = TensorRT 10.8.0.43, CUDA 12.8, Ubuntu 24.04, Python 3.12 (the
# TensorRT OSS samples name tensorrt:25.01-py3 for TensorRT 10.8; NVIDIA's Triton 25.01 matrix
# lists 10.8.0.43 and Python 3.12.3). `--target tensorrt` resolves to that version.
# Only sfc's runtime half is installed (docker/requirements.in: no torch).
# Never built: sfc's development machines run no Docker daemon (docker/README.md).
FROM nvcr.io/nvidia/tensorrt:25.01-py3

# PIP_BREAK_SYSTEM_PACKAGES: pip would refuse the system Python if the image keeps Ubuntu
# 24.04's EXTERNALLY-MANAGED marker. CUDA_ROOT: where pycuda's build finds cuda.h.
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_BREAK_SYSTEM_PACKAGES=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    CUDA_ROOT=/usr/local/cuda

# pycuda ships no Linux wheels: it compiles against Python's and CUDA's headers. Versions
# are pinned to the base image's series (exact Ubuntu revisions leave the archive).
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential=12.* python3-dev=3.12.* \
 && rm -rf /var/lib/apt/lists/*

# Bind mounts: the lock file and the sources build sfc without staying in a layer.
RUN --mount=type=bind,source=docker/requirements-tensorrt.txt,target=/tmp/requirements.txt \
    python3 -m pip install --no-cache-dir -r /tmp/requirements.txt
RUN --mount=type=bind,target=/tmp/sfc,rw \
    python3 -m pip install --no-cache-dir --no-deps /tmp/sfc \
 && python3 -c "import importlib.util as u, sys; sys.exit(u.find_spec('tensorrt') is None)" \
 && sfc --help > /dev/null

# A fixed id: `docker run -u "$(id -u):$(id -g)"` replaces it when files go to a mount.
RUN useradd --create-home --no-log-init --uid 10001 sfc
USER 10001
WORKDIR /work
ENTRYPOINT ["sfc"]
CMD ["--help"]

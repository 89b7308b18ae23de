# syntax=docker/dockerfile:1
# sfc on a Jetson Orin with JetPack 6.1/6.2: finishes a TensorRT build made where TensorRT is
# missing (`sfc build --from-qdq`) and benchmarks the engines (`sfc bench --device jetson`).
# Base: L4T r36.4.0 = JetPack 6.1, TensorRT 10.3, CUDA 12.6, Ubuntu 22.04, Python 3.10 (the
# only Python JetPack's TensorRT bindings are built for). `--target tensorrt` resolves to 10.3,
# which has no Python plugins: build for it with 8- or 4-bit weights.
# Only sfc's runtime half is installed (docker/requirements.in: no torch).
# Never built: sfc's development machines run no Docker daemon (docker/README.md).
FROM nvcr.io/nvidia/l4t-jetpack:r36.4.0

# CUDA_ROOT: where pycuda's build finds cuda.h.
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    CUDA_ROOT=/usr/local/cuda

# pycuda ships no Linux wheels: it compiles against Python's and CUDA's headers. Versions
# are pinned to the base image's series (exact Ubuntu revisions leave the archive).
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
        build-essential=12.* python3-dev=3.10.* python3-pip=22.* \
 && rm -rf /var/lib/apt/lists/*

# Bind mounts: the lock file and the sources build sfc without staying in a layer.
RUN --mount=type=bind,source=docker/requirements-jetson.txt,target=/tmp/requirements.txt \
    python3 -m pip install --no-cache-dir -r /tmp/requirements.txt
RUN --mount=type=bind,target=/tmp/sfc,rw \
    python3 -m pip install --no-cache-dir --no-deps /tmp/sfc \
 && python3 -c "import importlib.util as u, sys; sys.exit(u.find_spec('tensorrt') is None)" \
 && sfc --help > /dev/null

# Jetson's GPU device nodes belong to the video group (`--group-add video` keeps it when
# `docker run -u "$(id -u):$(id -g)"` replaces this fixed id for files written to a mount).
RUN useradd --create-home --no-log-init --uid 10001 --groups video sfc
USER 10001
WORKDIR /work
ENTRYPOINT ["sfc"]
CMD ["--help"]

# sfc's runtime on a Jetson Orin with JetPack 6.1/6.2 (L4T r36.4, TensorRT 10.3, CUDA 12.6).
#   docker build -f docker/jetson.Dockerfile -t sfc-jetson .        (on the Jetson)
#   docker run --runtime nvidia -v $PWD/build:/work/build sfc-jetson \
#       sh -c "cd build && sfc build --from-qdq encoder/model.trt.onnx -o encoder --target tensorrt:10.3"
# TensorRT 10.3 has no Python plugins, so build for it with 8- or 4-bit weights
# (`sfc check model.qdq.onnx --target tensorrt:10.3` says what it lacks).
# Only the runtime half is installed (no torch/transformers: export happens on the host);
# the TensorRT Python bindings come from JetPack. Not built on sfc's development machines.
ARG BASE=nvcr.io/nvidia/l4t-jetpack:r36.4.0
FROM ${BASE}
WORKDIR /opt/sfc
COPY pyproject.toml README.md ./
COPY compiler compiler
COPY kernels kernels
COPY docker/requirements-runtime.txt docker/requirements-runtime.txt
RUN pip3 install --no-cache-dir -r docker/requirements-runtime.txt pycuda \
 && pip3 install --no-cache-dir --no-deps -e .
WORKDIR /work
CMD ["sfc", "info"]

# sfc on an x86 NVIDIA GPU with TensorRT: finishes TensorRT builds (engines are built where
# they run) and benchmarks them.
#   docker build -f docker/tensorrt.Dockerfile -t sfc-trt .
#   docker run --gpus all -v $PWD/build:/work/build sfc-trt \
#       sh -c "cd build && sfc build --from-qdq encoder/model.trt.onnx -o encoder --target tensorrt"
# The base image's TensorRT version is what --target tensorrt resolves to (24.05 and later
# carry TensorRT 10). Not built on sfc's development machines (no Docker engine there).
ARG BASE=nvcr.io/nvidia/tensorrt:25.10-py3
FROM ${BASE}
WORKDIR /opt/sfc
COPY pyproject.toml README.md ./
COPY compiler compiler
COPY kernels kernels
COPY calibration_data calibration_data
# CPU torch is enough: torch only exports checkpoints; the engines run on TensorRT.
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu \
 && pip install --no-cache-dir -e . pycuda triton onnxruntime-extensions
WORKDIR /work
ENTRYPOINT []
CMD ["sfc", "info"]

# Two images: `device` measures latency tables and builds engines on a Jetson without torch;
# the default (last) stage is the whole project on an x86 GPU server.
#
# Jetson (recommended route, README "Jetson: tables measured on the device"): build ON the
# device from JetPack's own image, which brings TensorRT, CUDA and the Python they are built for.
#   JetPack 6 (Orin; TensorRT 10.3, CUDA 12, Python 3.10):
#     docker build --target device -t halp-device .
#   JetPack 5 (Xavier, Orin; TensorRT 8.5, CUDA 11.4, Python 3.8):
#     docker build --target device -t halp-device \
#         --build-arg DEVICE_BASE=nvcr.io/nvidia/l4t-jetpack:r35.4.1 \
#         --build-arg DEVICE_CUDA_PYTHON="cuda-python>=11.4,<12" .
#   docker run --runtime nvidia --rm -v $PWD:/work -w /work halp-device \
#       pipeline.device job.json --backend tensorrt --precision fp16 --out part.json
#   docker run --runtime nvidia --rm -v $PWD:/work -w /work halp-device \
#       pipeline engine --onnx pruned.onnx --backend tensorrt --precision fp16 --out engines/p
#
# x86_64 + discrete GPU (default stage):
#   docker build -t halp .
#   docker run --gpus all --rm -v $PWD:/work -w /work halp lut build --model resnet50 \
#       --input 1x3x224x224 --backend tensorrt --precision fp16 --out luts/r50-trt-fp16.json
ARG DEVICE_BASE=nvcr.io/nvidia/l4t-jetpack:r36.4.0
ARG BASE=nvcr.io/nvidia/tensorrt:24.10-py3

FROM ${DEVICE_BASE} AS device
# cuda-python times layers as CUDA graphs; its major must match JetPack's CUDA. Empty: layers
# are timed as direct enqueues (the table's provider says so).
ARG DEVICE_CUDA_PYTHON="cuda-python>=12,<13"
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 PYTHONPATH=/opt/halp
WORKDIR /opt/halp
# The package is not pip-installed: its metadata asks for torch and Python >= 3.10, and the
# device needs neither. JetPack's TensorRT bindings are built against numpy 1.x; onnx 1.17 is
# the last with Python 3.8 wheels; pycuda builds against JetPack's CUDA.
COPY pipeline ./pipeline
RUN python3 -m pip install --upgrade "pip<25.1" \
 && python3 -m pip install "numpy>=1.20,<2" "onnx>=1.14,<1.18" polygraphy tqdm pycuda \
        ${DEVICE_CUDA_PYTHON:+"$DEVICE_CUDA_PYTHON"} \
 && python3 -c "import tensorrt, pipeline.device; print('TensorRT', tensorrt.__version__)"
WORKDIR /work
ENTRYPOINT ["python3", "-m"]
CMD ["pipeline.device", "--help"]

FROM ${BASE}
# cuda-python's major must match the image's CUDA (12.x in the 24.10 TensorRT image; use
# "cuda-python>=13,<14" on a CUDA 13 image).
ARG CUDA_PYTHON="cuda-python>=12,<13"
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1

WORKDIR /opt/halp
COPY pyproject.toml README.md ./
COPY pipeline ./pipeline

# TensorRT's Python bindings come from the base image (never from pip here; the backend takes
# TensorRT 10.x and 11.x there), so only pycuda and cuda-python are added on top; torch comes
# from PyPI (its x86_64 wheels carry CUDA).
RUN python3 -m pip install --upgrade pip \
 && python3 -m pip install pycuda "$CUDA_PYTHON" . \
 && python3 -c "import tensorrt, pipeline; print('TensorRT', tensorrt.__version__)"

WORKDIR /work
ENTRYPOINT ["halp"]
CMD ["--help"]

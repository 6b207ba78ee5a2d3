# HALP pipeline image with TensorRT, for building LUTs and engines on the target.
#
# x86_64 + discrete GPU (default):
#   docker build -t halp .
#   docker run --gpus all --rm -v $PWD:/work -w /work halp lut build --model resnet50 \
#       --input 1x3x224x224 --backend tensorrt --precision fp16 --out luts/r50-trt-fp16.json
#
# Jetson Orin (JetPack 6.x, TensorRT 10.3): build ON the device with JetPack's base image and
# NVIDIA's torch for Jetson (PyPI's aarch64 torch has no CUDA):
#   docker build -t halp \
#       --build-arg BASE=nvcr.io/nvidia/l4t-jetpack:r36.4.0 \
#       --build-arg TORCH_INDEX=https://pypi.jetson-ai-lab.dev/jp6/cu126 .
#   docker run --runtime nvidia --rm -v $PWD:/work -w /work halp ...
# Jetson Xavier tops out at JetPack 5.1 (TensorRT 8.5, the first release with the name-based
# tensor API this project uses): BASE=nvcr.io/nvidia/l4t-jetpack:r35.4.1 and JetPack 5's torch.
ARG BASE=nvcr.io/nvidia/tensorrt:24.10-py3
FROM ${BASE}

# Extra index for torch/torchvision (Jetson: NVIDIA's wheels); empty means PyPI.
ARG TORCH_INDEX=""
# cuda-python times layers as CUDA graphs; its major must match the image's CUDA (12.x in the
# 24.10 TensorRT image and in JetPack 6; use "cuda-python>=13,<14" on a CUDA 13 image).
ARG CUDA_PYTHON="cuda-python>=12,<13"
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1

WORKDIR /opt/halp
COPY pyproject.toml README.md ./
COPY pipeline ./pipeline

# TensorRT's Python bindings come from the base image (never from pip here; the backend takes
# TensorRT 10.x and 11.x), so only pycuda and cuda-python are added on top; torch comes from
# TORCH_INDEX when given.
RUN python3 -m pip install --upgrade pip \
 && if [ -n "$TORCH_INDEX" ]; then \
        python3 -m pip install --extra-index-url "$TORCH_INDEX" torch torchvision; \
    fi \
 && python3 -m pip install pycuda "$CUDA_PYTHON" . \
 && python3 -c "import tensorrt, pipeline; print('TensorRT', tensorrt.__version__)"

WORKDIR /work
ENTRYPOINT ["halp"]
CMD ["--help"]

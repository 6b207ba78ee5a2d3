#!/usr/bin/env bash
# Device check: build a coarse LUT and run `halp verify` on it, printing the table last.
#
#   tools/device_check.sh          CUDA GPU: torch backend (cuDNN, CUDA events), resnet50 at
#                                  224x224, batch 32 and then batch 1 (where launch overhead and
#                                  weight streaming matter, as on a Jetson); sized for < 10
#                                  minutes on a datacenter GPU
#   tools/device_check.sh --cpu    the same flow on ONNX Runtime CPU with resnet18 at 64x64
#   tools/device_check.sh --tensorrt   a TensorRT machine (a GPU server, or a Jetson with torch):
#                                  the TensorRT-gated tests, then resnet18 at 224x224 planned
#                                  as a job, measured fp16 by the torch-free device builder and
#                                  verified on TensorRT
#   tools/device_check.sh --peers  CUDA GPU: tools/bench_peers.py on the torch backend at batch
#                                  32 and batch 1 (issue 12), targets 0.3 and 0.15, 2 seeds each;
#                                  OUT/peers-bN/report.json and peers.png
#
# Results land in $OUT (default /tmp/halp-device-check), one set per batch: lut-bN.json,
# verify-bN.json, verify-bN.png, verify-bN.txt. Wheels in ./wheels (e.g. torch-pruning for a
# machine without network access) are installed first, without dependencies. One pass per table:
# CUDA-event timings do not have a shared CPU's slow spells.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/halp-device-check}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
if compgen -G "wheels/*.whl" >/dev/null; then
  "$PY" -m pip install --quiet --no-deps --no-index wheels/*.whl
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if [ "${1:-}" = "--tensorrt" ]; then
  "$PY" -c 'import tensorrt; print("TensorRT", tensorrt.__version__)'
  HALP_TENSORRT=1 "$PY" -m pytest -q -m tensorrt tests
  input=1x3x224x224
  "$PY" -m pipeline lut plan --model resnet18 --input "$input" --max-points 4 --passes 1 \
    --out "$OUT/job.json"
  "$PY" -m pipeline.device "$OUT/job.json" --backend tensorrt --precision fp16 \
    --out "$OUT/lut-trt-fp16.json" --no-progress
  "$PY" -m pipeline verify --model resnet18 --input "$input" --lut "$OUT/lut-trt-fp16.json" \
    --samples 8 --report "$OUT/verify-trt-fp16.json" \
    --plot "$OUT/verify-trt-fp16.png" 2>&1 | grep -v 'it/s\]\|run/s\]\|arch/s\]' \
    | tee "$OUT/verify-trt-fp16.txt"
  exit "${PIPESTATUS[0]}"
fi

if [ "${1:-}" = "--peers" ]; then
  for batch in 32 1; do
    "$PY" tools/bench_peers.py --backend torch --device cuda --input "${batch}x3x32x32" \
      --targets 0.3 0.15 --seeds 2 --out "$OUT/peers-b$batch" 2>&1 \
      | grep -v 'it/s\]\|run/s\]\|batch/s\]' | tee "$OUT/peers-b$batch.txt"
  done
  exit 0
fi

if [ "${1:-}" = "--cpu" ]; then
  model=resnet18 batches=(1) size=3x64x64 backend=(--backend onnxruntime --threads 1)
else
  "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else
            "no CUDA GPU visible to torch: run tools/device_check.sh --cpu")'
  "$PY" -c 'import torch; print("GPU:", torch.cuda.get_device_name(0), "torch", torch.__version__)'
  model=resnet50 batches=(32 1) size=3x224x224 backend=(--backend torch --device cuda)
fi

start=$(date +%s)
rc=0
for batch in "${batches[@]}"; do
  input="${batch}x$size"
  "$PY" -m pipeline lut build --model "$model" --input "$input" "${backend[@]}" --max-points 4 \
    --passes 1 --out "$OUT/lut-b$batch.json" --no-progress
  echo "batch $batch: LUT built after $(( $(date +%s) - start )) s"
  set +e
  "$PY" -m pipeline verify --model "$model" --input "$input" --lut "$OUT/lut-b$batch.json" \
    --samples 8 --report "$OUT/verify-b$batch.json" --plot "$OUT/verify-b$batch.png" 2>&1 \
    | grep -v 'it/s\]\|run/s\]\|arch/s\]' | tee "$OUT/verify-b$batch.txt"
  status=${PIPESTATUS[0]}
  set -e
  [ "$status" -eq 0 ] || rc=$status
done
echo "device check finished in $(( $(date +%s) - start )) s (verify exit $rc)"
exit "$rc"

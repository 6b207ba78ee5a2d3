#!/usr/bin/env bash
# Device check: build a coarse LUT and run `halp verify` on it, printing the table last.
#
#   tools/device_check.sh          CUDA GPU: torch backend (cuDNN, CUDA events), resnet50 at
#                                  batch 32, 224x224; sized for < 8 minutes on a datacenter GPU
#   tools/device_check.sh --cpu    the same flow on ONNX Runtime CPU with resnet18 at 64x64
#
# Results land in $OUT (default /tmp/halp-device-check): lut.json, verify.json, verify.png,
# verify.txt. Wheels in ./wheels (e.g. torch-pruning for a machine without network access) are
# installed first, without dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/halp-device-check}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
if compgen -G "wheels/*.whl" >/dev/null; then
  "$PY" -m pip install --quiet --no-deps --no-index wheels/*.whl
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if [ "${1:-}" = "--cpu" ]; then
  model=resnet18 input=1x3x64x64 backend=(--backend onnxruntime --threads 1)
else
  "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else
            "no CUDA GPU visible to torch: run tools/device_check.sh --cpu")'
  "$PY" -c 'import torch; print("GPU:", torch.cuda.get_device_name(0), "torch", torch.__version__)'
  model=resnet50 input=32x3x224x224 backend=(--backend torch --device cuda)
fi

start=$(date +%s)
"$PY" -m pipeline lut build --model "$model" --input "$input" "${backend[@]}" --max-points 4 \
  --out "$OUT/lut.json" --no-progress
echo "LUT built in $(( $(date +%s) - start )) s"
set +e
"$PY" -m pipeline verify --model "$model" --input "$input" --lut "$OUT/lut.json" --samples 8 \
  --report "$OUT/verify.json" --plot "$OUT/verify.png" 2>&1 | grep -v 'it/s\]\|run/s\]\|arch/s\]' \
  | tee "$OUT/verify.txt"
rc=${PIPESTATUS[0]}
echo "device check finished in $(( $(date +%s) - start )) s (verify exit $rc)"
exit "$rc"

#!/usr/bin/env bash
# Issue 17: Gemma 3 27B float64 reference tensor-parallel over 2 H200s (NCCL) vs torch:cuda bfloat16 on one GPU,
# per layer, prefill + decode. On nvidia-h200-x4, also: MODEL=gemma4-31b NPROC=4 tests/tools/gpu/tp27b.sh
#   run (kind nvidia-h200-x2):  bash tests/tools/gpu/tp27b.sh
# Prints the tables; writes $OUT/tp.md, $OUT/tp.json, $OUT/runs.sqlite and $OUT/log.
set -uo pipefail
cd "$(dirname "$0")/../../.."
# NVLink multicast stays off (the device notes: a program using it can take the host's GPUs out of service)
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export OUT="${OUT:-$PWD/out}"
mkdir -p "$OUT"
PY="${PY:-python3}"
MODEL="${MODEL:-gemma3-27b}"
NPROC="${NPROC:-2}"
nvidia-smi -L
df -h "${WB_DISK:-/tmp}" | tail -1
"$PY" tests/tools/gpu/tp27b.py --model "$MODEL" --nproc "$NPROC" --tokens "${TOKENS:-64}" \
    --decode-steps "${DECODE_STEPS:-4}" --dtypes "${DTYPES:-bfloat16}" --out "$OUT" 2>&1 | tee "$OUT/log"

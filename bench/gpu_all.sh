#!/usr/bin/env bash
# Everything issue 13 measures on a GPU, in one call on the lent machine (GPU time is short and the
# machine starts bare). From the project root here:
#   bash ../shared/gpu/prepare.sh && rm .gpu/whl/numpy-1.26*.whl   # keep the machine's numpy 2
#   bash bench/gpu_extras.sh                                          # optional: nvImageCodec, measured beside nvJPEG
# then on the device, carrying .gpu:  bash bench/gpu_all.sh
# Writes machine.txt, install.txt, gpu.txt (bench/gpu.py's table and ratios) and tests.txt (the
# device-path tests, which run on CUDA where there is one) to $OUT.
set -uo pipefail
out=${OUT:-/tmp/prelabel-gpu}; mkdir -p "$out"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; echo "cores: $(nproc)"; python3 -V; } \
  2>&1 | tee "$out/machine.txt"
bash .gpu/install.sh > "$out/install.txt" 2>&1 || { tail -20 "$out/install.txt"; exit 1; }
if [ -f .gpu/nvimgcodec-slim.tar.xz ]; then  # bench/gpu_extras.sh: nvImageCodec for bench/gpu.py's decode comparison
  tar -xJf .gpu/nvimgcodec-slim.tar.xz -C "$(python3 -c 'import site; print(site.getsitepackages()[0])')"
fi
tail -1 "$out/install.txt"
python3 -c "import numpy; print('numpy', numpy.__version__)" 2>&1 | tee -a "$out/machine.txt"
timeout "${GPU_TEST_SECONDS:-120}" python3 -m pytest -q -p no:cacheprovider tests/test_models.py -k "device or runner or jpeg" \
  2>&1 | tail -60 | tee "$out/tests.txt"
timeout "${GPU_BENCH_SECONDS:-330}" python3 bench/gpu.py "$@" 2>&1 | tee "$out/gpu.txt"

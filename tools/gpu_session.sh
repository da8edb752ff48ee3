#!/usr/bin/env bash
# One command for a lent GPU machine (the device tool runs it in the repo root):
#   bash tools/gpu_session.sh [tests|bench|all]
# installs the package against the machine's torch (CUDA part of _C included), runs the test
# suite on the GPU and/or every benchmark, and packs logs + results into $OUT/gpu-results.tgz
# (the device tool returns at most 8 files). Unpack that into bench/ here and commit
# bench/results/*.json, the PNGs and the regenerated bench/RESULTS.md.
set -uo pipefail
what=${1:-all}
out=${OUT:-/tmp/gpu-out}
work=$(mktemp -d)
mkdir -p "$out" "$work/results"
export PYTHONUNBUFFERED=1

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$work/device.txt" 2>&1
python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" >> "$work/device.txt"
cat "$work/device.txt"

if ! FORCE_CUDA=1 python3 -m pip install --no-build-isolation --no-deps -e . > "$work/install.log" 2>&1; then
    tail -40 "$work/install.log"
    tar czf "$out/gpu-results.tgz" -C "$work" .
    exit 1
fi
python3 -c "import condense_engine._C as c; print('extension with CUDA:', c.with_cuda)"

status=0
if [[ $what == tests || $what == all ]]; then
    python3 -m pytest -q -n 4 --timeout 600 tests 2>&1 | tee "$work/tests.log" | tail -25 || status=1
fi
if [[ $what == bench || $what == all ]]; then
    python3 -m bench --results-dir "$work/results" --report "$work/RESULTS.md" 2>&1 | tee "$work/bench.log" | tail -60 || status=1
fi
tar czf "$out/gpu-results.tgz" -C "$work" .
exit $status

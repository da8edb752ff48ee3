#!/usr/bin/env bash
# Steps for a lent GPU machine (the device tool runs each in the repo root; one step per call
# keeps every call under the tool's 10-minute limit, and the machine keeps the install between
# calls while it stays warm):
#   bash tools/gpu_session.sh install      # build _C with its CUDA part against the machine's torch
#   bash tools/gpu_session.sh tests        # the test suite on the GPU
#   bash tools/gpu_session.sh bench [NAME ...]   # benchmarks (default: all); condense_time is
#                                          # extrapolated from 2000 measured iterations
#   bash tools/gpu_session.sh all          # the three in turn (only when time allows)
# Logs and results accumulate in $GPU_SESSION_DIR (default /tmp/gpu-session) and every step packs
# them into $OUT/gpu-results.tgz. Unpack that into bench/ here and commit bench/results/*.json,
# the PNGs and the regenerated bench/RESULTS.md.
set -uo pipefail
step=${1:-all}
shift || true
out=${OUT:-/tmp/gpu-out}
work=${GPU_SESSION_DIR:-/tmp/gpu-session}
mkdir -p "$out" "$work/results"
export PYTHONUNBUFFERED=1
status=0

pack() { tar czf "$out/gpu-results.tgz" -C "$work" .; }

install() {
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$work/device.txt" 2>&1
    python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" >> "$work/device.txt"
    cat "$work/device.txt"
    if ! FORCE_CUDA=1 python3 -m pip install --no-build-isolation --no-deps -e . > "$work/install.log" 2>&1; then
        tail -40 "$work/install.log"
        return 1
    fi
    python3 -c "import condense_engine._C as c; print('extension with CUDA:', c.with_cuda)"
}

tests() {
    python3 -m pytest -q -n 4 --timeout 600 tests 2>&1 | tee "$work/tests.log" | tail -25
    return "${PIPESTATUS[0]}"
}

bench() {
    local names=("$@") kernels=() code=0
    [[ ${#names[@]} -eq 0 ]] && names=(mmd dsa embed trajectory dm_iteration evaluate condense_time)
    for name in "${names[@]}"; do [[ $name != condense_time ]] && kernels+=("$name"); done
    if [[ ${#kernels[@]} -gt 0 ]]; then
        python3 -m bench --only "${kernels[@]}" --results-dir "$work/results" --report "$work/RESULTS.md" \
            2>&1 | tee -a "$work/bench.log" | tail -60
        code=${PIPESTATUS[0]}
    fi
    if [[ " ${names[*]} " == *" condense_time "* ]]; then
        python3 -m bench.condense_time --measure-iterations 2000 --out "$work/results/condense_time.json" \
            2>&1 | tee -a "$work/bench.log" | tail -10
        [[ ${PIPESTATUS[0]} -ne 0 ]] && code=1
        python3 -m bench.report --results-dir "$work/results" --out "$work/RESULTS.md" || code=1
    fi
    return $code
}

case $step in
    install) install || status=1 ;;
    tests) tests || status=1 ;;
    bench) bench "$@" || status=1 ;;
    all) { install && tests; } || status=1; bench || status=1 ;;
    *) echo "unknown step $step (install | tests | bench [NAME ...] | all)" >&2; status=2 ;;
esac
pack
exit $status

#!/usr/bin/env bash
# Steps for a lent GPU machine (the device tool runs each in the repo root; one step per call
# keeps every call under the tool's 10-minute limit, and the machine keeps the install between
# calls while it stays warm):
#   bash tools/gpu_session.sh install      # build _C with its CUDA part against the machine's torch
#   bash tools/gpu_session.sh tests        # the test suite on the GPU
#   bash tools/gpu_session.sh bench [NAME ...]   # benchmarks (default: all); condense_time is
#                                          # extrapolated from 2000 measured iterations
#   bash tools/gpu_session.sh all          # the three in turn (only when time allows)
# TinyImageNet (real, 200 classes) on the GPU: stage it here first,
#   bash ../shared/tools/stage.sh /work/data/tiny-imagenet-200 .stage/tiny 50   (note the file count)
# then one device call per part, back to back so the machine stays warm, each carrying that part:
#   bash tools/gpu_session.sh tiny-part .stage/tiny/part-aa       (carry: [".stage/tiny/part-aa"])
#   bash tools/gpu_session.sh tiny-unpack FILE_COUNT              # rebuilds the tree, checks the count
#   bash tools/gpu_session.sh tiny-accuracy IPC [ITERATIONS [EPOCHS]]   # DM and M3D, rows into results/
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

# The staged data set stays on the machine; only logs and results come back.
pack() { tar czf "$out/gpu-results.tgz" --exclude=./data --exclude=./tiny-parts -C "$work" .; }

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

tiny_part() {
    local part=${1:?tiny-part needs the path of the carried part}
    mkdir -p "$work/tiny-parts" && cp "$part" "$work/tiny-parts/" && ls -l "$work/tiny-parts"
}

tiny_unpack() {
    local expected=${1:?tiny-unpack needs the file count stage.sh printed} found
    mkdir -p "$work/data/tinyimagenet"
    cat "$work/tiny-parts"/part-* | tar -x -C "$work/data/tinyimagenet" || return 1
    found=$(find "$work/data/tinyimagenet/tiny-imagenet-200" -type f | wc -l)
    echo "TinyImageNet files: $found (staged: $expected)"
    [[ $found -eq $expected ]] && rm -rf "$work/tiny-parts"
}

tiny_accuracy() {
    local ipc=${1:?tiny-accuracy needs an IPC} iterations=${2:-} epochs=${3:-1000}
    python3 -m bench.accuracy --methods dm m3d --datasets tinyimagenet --ipcs "$ipc" \
        ${iterations:+--iterations "$iterations"} --epochs "$epochs" --device cuda \
        --data-root "$work/data" --out "$work/results/accuracy-$(date -u +%Y%m%d-%H%M%S)-tiny-ipc$ipc.json" \
        --results-dir "$work/results" --report "$work/RESULTS.md" 2>&1 | tee -a "$work/accuracy.log" | tail -20
    return "${PIPESTATUS[0]}"
}

case $step in
    install) install || status=1 ;;
    tests) tests || status=1 ;;
    bench) bench "$@" || status=1 ;;
    all) { install && tests; } || status=1; bench || status=1 ;;
    tiny-part) tiny_part "$@" || status=1 ;;
    tiny-unpack) tiny_unpack "$@" || status=1 ;;
    tiny-accuracy) tiny_accuracy "$@" || status=1 ;;
    *) echo "unknown step $step (install | tests | bench [NAME ...] | all | tiny-part | tiny-unpack | tiny-accuracy)" >&2
       status=2 ;;
esac
pack
exit $status

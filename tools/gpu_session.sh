#!/usr/bin/env bash
# Steps for a lent GPU machine (the device tool runs each in the repo root; one step per call
# keeps every call under the tool's 10-minute limit, and the machine keeps the install between
# calls while it stays warm):
#   bash tools/gpu_session.sh install      # build _C with its CUDA part against the machine's torch
#   bash tools/gpu_session.sh tests        # the test suite on the GPU
#   bash tools/gpu_session.sh bench NAME [NAME ...]   # benchmarks (default: all; one or two per
#                                          # call); condense_time is extrapolated from 20 s per case
#   bash tools/gpu_session.sh all          # the three in turn (only when time allows)
# A task's whole device time (15 minutes, the machine's start included) fits about two calls, so
# use the plan: its steps in order of what the open issues still need, each cut to the time left,
# each run once; call it again right after (the machine still warm) with the seconds left and it
# goes on with the steps not yet run:
#   bash tools/gpu_session.sh plan 560     (timeout_s 600)
#   bash tools/gpu_session.sh plan 150     (timeout_s 180, only when status leaves that much)
# TinyImageNet (real, 200 classes) on the GPU: stage it here first,
#   bash ../shared/tools/stage.sh /work/data/tiny-imagenet-200 .stage/tiny 50   (note the file count)
# then one device call per part, back to back so the machine stays warm, each carrying that part:
#   bash tools/gpu_session.sh tiny-part .stage/tiny/part-aa       (carry: [".stage/tiny/part-aa"])
#   bash tools/gpu_session.sh tiny-unpack FILE_COUNT              # rebuilds the tree, checks the count
#   bash tools/gpu_session.sh tiny-accuracy IPC [ITERATIONS [EPOCHS]]   # DM and M3D, in the background
#   bash tools/gpu_session.sh wait [SECONDS]      # poll it (each call < 10 min), rows into results/
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

# The staged data set and the distilled sets (.pt) stay on the machine; only logs and results come back.
pack() { tar czf "$out/gpu-results.tgz" --exclude=./data --exclude=./tiny-parts --exclude='*.pt' -C "$work" .; }

install() {
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$work/device.txt" 2>&1
    python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" >> "$work/device.txt"
    cat "$work/device.txt"
    if ! FORCE_CUDA=1 python3 -m pip install --no-build-isolation --no-deps -e . > "$work/install.log" 2>&1; then
        tail -40 "$work/install.log"
        echo "CUDA build failed; building the CPU extension so the rest can still run" >&2
        python3 -m pip install --no-build-isolation --no-deps -e . >> "$work/install.log" 2>&1 || return 1
        return 1
    fi
    python3 -c "import condense_engine._C as c; print('extension with CUDA:', c.with_cuda)"
}

# Every long command runs under `timeout` so that the step still packs what it has before the
# device call's own 10-minute limit, and before the plan's deadline when one is set.
limit=${STEP_TIMEOUT:-540}
deadline=
seconds_left() {
    local left=$limit
    [[ -n $deadline ]] && left=$(( deadline - $(date +%s) - 15 ))  # 15 s to pack what it has
    (( left > limit )) && left=$limit
    echo $(( left > 1 ? left : 1 ))  # never 0: `timeout 0` would not time out at all
}

tests() {
    timeout "$(seconds_left)" python3 -m pytest -q -n 8 --timeout 300 "${@:-tests}" 2>&1 | tee -a "$work/tests.log" | tail -25
    return "${PIPESTATUS[0]}"
}

# One benchmark at a time, each under the time limit: every bench writes its file row by row,
# so one cut off by the limit still returns the cases it finished.
bench() {
    local names=("$@") code=0
    [[ ${#names[@]} -eq 0 ]] && names=(mmd dsa embed match_dist moments trajectory dm_iteration evaluate condense_time)
    for name in "${names[@]}"; do
        if [[ $name == condense_time ]]; then
            timeout "$(seconds_left)" python3 -m bench.condense_time --measure-seconds 20 \
                --out "$work/results/condense_time.json" 2>&1 | tee -a "$work/bench.log" | tail -10
        else
            timeout "$(seconds_left)" python3 -m bench --only "$name" --results-dir "$work/results" --no-report \
                2>&1 | tee -a "$work/bench.log" | tail -40
        fi
        [[ ${PIPESTATUS[0]} -ne 0 ]] && code=1
        pack
    done
    if [[ ${report:-1} == 1 ]]; then
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

# Accuracy runs outlast one call: they start in a new process session (setsid), which the device
# tool leaves running between calls while the machine stays held; `wait` polls them.
tiny_accuracy() {
    local ipc=${1:?tiny-accuracy needs an IPC} iterations=${2:-} epochs=${3:-1000}
    setsid nohup python3 -m bench.accuracy --methods dm m3d --datasets tinyimagenet --ipcs "$ipc" \
        ${iterations:+--iterations "$iterations"} --epochs "$epochs" --device cuda \
        --data-root "$work/data" --save-dir "$work/sets" --out "$work/results/accuracy-$(date -u +%Y%m%d-%H%M%S)-tiny-ipc$ipc.json" \
        --results-dir "$work/results" --report "$work/RESULTS.md" >> "$work/accuracy.log" 2>&1 < /dev/null &
    echo $! > "$work/background.pid"
    echo "started TinyImageNet IPC $ipc in the background (pid $!); poll with: wait SECONDS"
}

wait_background() {
    local seconds=${1:-500} pid
    pid=$(cat "$work/background.pid" 2>/dev/null) || { echo "nothing runs in the background"; return 0; }
    for ((waited = 0; waited < seconds; waited += 10)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 10
    done
    tail -20 "$work/accuracy.log"
    for log in "$work"/sets/*/log.jsonl; do [ -f "$log" ] && echo "$(basename "$(dirname "$log")"): $(tail -n 1 "$log")"; done
    if kill -0 "$pid" 2>/dev/null; then echo "still running (pid $pid)"; else echo "finished"; rm -f "$work/background.pid"; fi
}

# The kernels' own tests: the GPU paths of every op the benchmarks time.
KERNEL_TESTS=(tests/test_mmd.py tests/test_dsa.py tests/test_dsa_triton.py tests/test_embed_epilogue.py
              tests/test_gather.py tests/test_bank.py tests/test_match_dist.py tests/test_moments.py
              tests/test_trajectory.py)
# What the open issues need from a GPU, most needed first: the CUDA build, the kernels checked on
# the device, then the benchmarks behind the speed targets of issues 3, 4, 6 and 5, then the rest.
PLAN=(install kernel-tests mmd dsa dm_iteration condense_time trajectory embed match_dist moments evaluate tests)

plan() {
    local seconds=${1:?plan needs the seconds this call may use} task code=0
    deadline=$(( $(date +%s) + seconds ))
    mkdir -p "$work/done"
    for task in "${PLAN[@]}"; do
        [[ -e $work/done/$task ]] && continue
        if (( $(seconds_left) < 45 )); then echo "plan: out of time before $task"; break; fi
        echo "=== plan: $task ($(seconds_left) s left) ==="
        case $task in
            install) install || { echo "plan: no CUDA build; stopping"; return 1; } ;;
            kernel-tests) limit=180 tests "${KERNEL_TESTS[@]}" || code=1 ;;  # leave the rest to the benchmarks
            tests) tests || code=1 ;;
            *) report=0 bench "$task" || code=1 ;;  # RESULTS.md is rebuilt from the JSON at home
        esac
        touch "$work/done/$task"  # run once: a cut benchmark keeps the rows it wrote
    done
    echo "plan: done $(ls "$work/done" | tr '\n' ' ')"
    return $code
}

case $step in
    install) install || status=1 ;;
    tests) tests "$@" || status=1 ;;
    bench) bench "$@" || status=1 ;;
    all) { install && tests; } || status=1; bench || status=1 ;;
    plan) plan "$@" || status=1 ;;
    tiny-part) tiny_part "$@" || status=1 ;;
    tiny-unpack) tiny_unpack "$@" || status=1 ;;
    tiny-accuracy) tiny_accuracy "$@" || status=1 ;;
    wait) wait_background "$@" || status=1 ;;
    *) echo "unknown step $step (install | tests [FILES] | bench [NAME ...] | all | plan SECONDS | tiny-part | tiny-unpack | tiny-accuracy | wait)" >&2
       status=2 ;;
esac
pack
exit $status

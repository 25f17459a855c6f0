#!/usr/bin/env bash
# The GPU checks and measurements of the speed issue in one script, for a GPU lent for a few minutes (the device
# tool: one call of at most 10 minutes), most important first, all inside one deadline (BUDGET seconds, default
# 540): each stage gets what is left up to its own limit, and a stage is skipped when less than a minute is left.
#   0. a preflight: torch.compile of a tiny function on the GPU (Triton needs a C compiler and Python's headers)
#   1. the CUDA tests (CUDA graphs, the compiled step in bf16 and int8, the pipeline on the GPU)
#   2. batch-1 decode of a random paligemma-3b-224 in bf16: nanopali (CUDA graph of the eager step),
#      nanopali-compile (torch.compile + CUDA graph) and transformers, against the HBM bound measured in the run
#   3. int8 on the GPU: nanopali-int8 (graph of the eager step) and nanopali-compile-int8
#   4. batch 8 and 32: nanopali, nanopali-compile, transformers
#
#   benchmarks/gpu_check.sh [STAGE...]          # stages: tests b1 int8 batch (default: all four, in that order)
#
# Logs, tables and JSON go to $OUT (the device tool's folder) or /tmp/gpu-check; summary.txt has every table and,
# for a stage cut short, the end of its log. Exits 1 if a stage failed or was cut short. Uses the python3 that
# holds torch there (PYTHON= to change) and this checkout on PYTHONPATH: nothing is installed.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/gpu-check}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
model=${MODEL:-/tmp/pg3b}
stages=${*:-tests b1 int8 batch}
end=$((SECONDS + ${BUDGET:-540}))
failed=0

log() { echo "== $(date +%T) $*" | tee -a "$out/summary.txt"; }
left() { echo $((end - SECONDS)); }
limit() { local l; l=$(left); echo $((l < $1 ? l : $1)); }  # the stage's limit, or what is left if less
run() {  # run NAME LIMIT COMMAND...: its stdout in NAME.txt, stderr in NAME.log; their ends in the summary if it failed
    local name=$1 l; l=$(limit "$2"); shift 2
    if [ "$l" -lt 60 ]; then log "$name skipped: ${l}s left"; failed=1; return 1; fi
    log "$name (up to ${l}s): $*"
    timeout "$l" "$@" >"$out/$name.txt" 2>"$out/$name.log"
    local rc=$?
    if [ $rc -ne 0 ]; then
        failed=1
        log "$name exit $rc$([ $rc -eq 124 ] && echo ' (cut short)')"
        tail -n 20 "$out/$name.log" "$out/$name.txt" >>"$out/summary.txt"
    fi
    return $rc
}
bench() {  # bench NAME LIMIT ARGS...: one bench_generate run; its table (stdout) in the summary
    local name=$1 l=$2; shift 2
    [ -f "$model/config.json" ] || run make 120 "$py" scripts/make_random_checkpoint.py --name paligemma-3b-224 \
        --dtype bfloat16 --device cuda --out "$model" || return 1
    run "$name" "$l" "$py" benchmarks/bench_generate.py --model "$model" --device cuda --json "$out/$name.json" "$@" \
        && cat "$out/$name.txt" >>"$out/summary.txt"
}

log "start: $("$py" -c 'import torch, transformers; print("torch", torch.__version__, "transformers",
    transformers.__version__, torch.cuda.get_device_name())' 2>&1 | tail -1)"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem --format=csv,noheader 2>&1 | tee -a "$out/summary.txt"
run preflight 90 "$py" -c 'import torch; f = torch.compile(lambda x: x * 2 + 1, fullgraph=True)
print("torch.compile on the GPU:", f(torch.ones(4, device="cuda")).tolist())' && cat "$out/preflight.txt" >>"$out/summary.txt"
for stage in $stages; do
    case $stage in
    tests)
        run tests 180 "$py" -m pytest -q -p no:cacheprovider -k "cuda or gpu" tests/test_cuda_graphs.py \
            tests/test_compiled_step.py tests/test_pipeline.py tests/test_answers.py
        tail -n 15 "$out/tests.txt" >>"$out/summary.txt" ;;
    b1) bench b1 300 --frameworks nanopali,nanopali-compile,transformers --new-tokens 64 --runs 3 ;;
    int8) bench int8 200 --frameworks nanopali-int8,nanopali-compile-int8 --new-tokens 64 --runs 3 ;;
    batch)
        for b in 8 32; do
            bench "batch$b" 150 --frameworks nanopali,nanopali-compile,transformers --new-tokens 32 --runs 2 --batch "$b"
        done ;;
    *) log "unknown stage $stage (tests b1 int8 batch)"; failed=1 ;;
    esac
done
log "done, $(left)s of the budget left"
exit $failed

#!/usr/bin/env bash
# The GPU checks and measurements of the speed issue in one script, for a GPU lent for a few minutes (the device
# tool: one 10-minute call), most important first, each stage under its own time limit so a slow one cannot eat
# the rest:
#   1. the CUDA tests (CUDA graphs, the compiled step in bf16 and int8, the pipeline on the GPU)
#   2. batch-1 decode of a random paligemma-3b-224 in bf16: nanopali (CUDA graph of the eager step),
#      nanopali-compile (torch.compile + CUDA graph) and transformers, against the HBM bound measured in the run
#   3. int8 on the GPU: nanopali-compile-int8 (and nanopali-eager, the step without graph or compile)
#   4. batch 8 and 32: nanopali, nanopali-compile, transformers
#
#   benchmarks/gpu_check.sh [STAGE...]          # stages: tests b1 int8 batch (default: all four, in that order)
#
# Logs and JSON go to $OUT (the device tool's folder) or /tmp/gpu-check. Uses the python3 that holds torch there
# (PYTHON= to change) and this checkout on PYTHONPATH: nothing is installed.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/gpu-check}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
model=${MODEL:-/tmp/pg3b}
stages=${*:-tests b1 int8 batch}

log() { echo "== $(date +%T) $*" | tee -a "$out/summary.txt"; }
bench() {  # bench NAME TIMEOUT ARGS...: one bench_generate run, its table appended to summary.txt
    local name=$1 limit=$2; shift 2
    log "bench $name: $*"
    timeout "$limit" "$py" benchmarks/bench_generate.py --model "$model" --device cuda --json "$out/$name.json" "$@" \
        >"$out/$name.txt" 2>"$out/$name.log"
    echo "exit $?" >>"$out/$name.txt"
    cat "$out/$name.txt" >>"$out/summary.txt"
}

log "start: $("$py" -c 'import torch, transformers; print("torch", torch.__version__, "transformers",
    transformers.__version__, torch.cuda.get_device_name())')"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem --format=csv,noheader | tee -a "$out/summary.txt"
if [ ! -f "$model/config.json" ]; then
    log "drawing a random paligemma-3b-224 on the GPU into $model"
    "$py" scripts/make_random_checkpoint.py --name paligemma-3b-224 --dtype bfloat16 --device cuda --out "$model" \
        >"$out/make.log" 2>&1 || { log "make_random_checkpoint failed"; tail "$out/make.log" | tee -a "$out/summary.txt"; }
fi
for stage in $stages; do
    case $stage in
    tests)
        log "CUDA tests"
        timeout 180 "$py" -m pytest -q -p no:cacheprovider -k "cuda or gpu" tests/test_cuda_graphs.py \
            tests/test_compiled_step.py tests/test_pipeline.py tests/test_answers.py tests/test_loading_hardening.py \
            2>&1 | tail -25 | tee -a "$out/summary.txt" ;;
    b1) bench b1 300 --frameworks nanopali,nanopali-compile,transformers --new-tokens 64 --runs 3 ;;
    int8) bench int8 200 --frameworks nanopali-compile-int8,nanopali-eager --new-tokens 64 --runs 3 ;;
    batch)
        for b in 8 32; do
            bench "batch$b" 150 --frameworks nanopali,nanopali-compile,transformers --new-tokens 32 --runs 2 --batch "$b"
        done ;;
    *) log "unknown stage $stage (tests b1 int8 batch)" ;;
    esac
done
log "done"

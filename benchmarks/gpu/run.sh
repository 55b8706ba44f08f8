#!/usr/bin/env bash
# Run the GPU benchmark commands of benchmarks/RESULTS.md on a lent GPU machine, one after another,
# each stopped at a shared deadline so that whatever finished comes back (JSON/markdown/log per run).
# usage: benchmarks/gpu/run.sh SECONDS OUTDIR RUN... where RUN is one of the names below.
# Issue 29 (kernel economy), eager and compiled at batch 1 and 16 (a machine's wheels: RESULTS.md, H200 section):
#   benchmarks/gpu/run.sh 540 out llava7b-compiled-b1 llava7b-graphs-b1 llava7b-compiled-b16
# Issue 30 (AnyRes equal budgets at the LLaVA-NeXT-7B geometry): benchmarks/gpu/run.sh 560 out next7b-anyres
set -u
budget=$1; out=$2; shift 2
deadline=$(( $(date +%s) + budget ))
bench() {  # name, then focusvlm bench arguments
    local name=$1; shift
    local left=$(( deadline - $(date +%s) ))
    if [ "$left" -lt 60 ]; then echo "[gpu] skipped $name: ${left}s left"; return; fi
    echo "[gpu] $name (${left}s left)"
    PYTHONUNBUFFERED=1 timeout "$left" python3 -m focusvlm bench --device cuda --dtype bfloat16 "$@" \
        --json "$out/$name.json" --markdown "$out/$name.md" >"$out/$name.log" 2>&1
    echo "[gpu] $name exit $?"; tail -n 25 "$out/$name.log"
}
for run in "$@"; do
    case $run in
    llava7b-b1) bench "$run" --preset llava-1.5-7b --methods stock,eager,spd,prumerge,vmtc,cmai,vmtc+cmai --batch 1 \
        --prompt-tokens 64 --new-tokens 128 --repeats 5 --warmup 2 ;;
    llava7b-b16) bench "$run" --preset llava-1.5-7b --methods stock,eager,spd,prumerge,vmtc,cmai,vmtc+cmai --batch 16 \
        --prompt-tokens 64 --new-tokens 128 --repeats 5 --warmup 2 ;;
    llava7b-long) bench "$run" --preset llava-1.5-7b --methods stock,cmai --batch 1,4 --prompt-tokens 256,1024 \
        --new-tokens 32 --repeats 3 --warmup 1 ;;
    llava7b-profile) bench "$run" --preset llava-1.5-7b --methods stock,vmtc,cmai --batch 1 --new-tokens 16 \
        --repeats 2 --warmup 1 --profile 25 ;;
    llava7b-counts) bench "$run" --preset llava-1.5-7b --methods stock,cmai,vmtc --batch 1 --prompt-tokens 64 \
        --new-tokens 16 --repeats 2 --warmup 1 --count-ops ;;
    llava7b-compiled) bench "$run" --preset llava-1.5-7b --methods stock,vmtc,cmai,vmtc+cmai --batch 1,16 \
        --prompt-tokens 64 --new-tokens 128 --repeats 5 --warmup 2 --compile --count-ops ;;
    # the same, one batch size per run, so that a run stopped at the deadline loses only its own batch size
    llava7b-compiled-b1) bench "$run" --preset llava-1.5-7b --methods stock,vmtc,cmai,vmtc+cmai --batch 1 \
        --prompt-tokens 64 --new-tokens 128 --repeats 5 --warmup 2 --compile --count-ops ;;
    llava7b-compiled-b16) bench "$run" --preset llava-1.5-7b --methods stock,vmtc,cmai,vmtc+cmai --batch 16 \
        --prompt-tokens 64 --new-tokens 128 --repeats 3 --warmup 1 --compile ;;
    # the tower in CUDA graphs too (its static shapes allow it; VMTC's ~130 extra launches per tower at batch 1)
    llava7b-graphs-b1) bench "$run" --preset llava-1.5-7b --methods stock,vmtc,cmai,vmtc+cmai --batch 1 \
        --prompt-tokens 64 --new-tokens 64 --repeats 3 --warmup 1 --compile --tower-graphs ;;
    next7b-anyres) bench "$run" --preset llava-v1.6-vicuna-7b --batch 1 --prompt-tokens 64 --new-tokens 16 \
        --repeats 3 --warmup 1 --methods "$(cat "$(dirname "$0")/anyres_arms.txt")" ;;
    next7b) bench "$run" --preset llava-v1.6-vicuna-7b --methods stock,vmtc,cmai,vmtc+cmai --batch 1,16 --repeats 3 --warmup 1 ;;
    ov7b) bench "$run" --preset llava-onevision-qwen2-7b --methods stock,vmtc,cmai,vmtc+cmai --batch 1,16 --repeats 3 --warmup 1 ;;
    qwen25) bench "$run" --preset qwen2.5-vl-7b --methods stock,vmtc,cmai,vmtc+cmai --batch 1,16 --new-tokens 128 --repeats 3 --warmup 1 ;;
    qwen3) bench "$run" --preset qwen3-vl-8b --methods stock,vmtc,cmai,vmtc+cmai --batch 1,16 --new-tokens 128 --repeats 3 --warmup 1 ;;
    *) echo "[gpu] unknown run $run"; exit 2 ;;
    esac
done

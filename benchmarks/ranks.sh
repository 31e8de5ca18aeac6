#!/usr/bin/env bash
# One process with one thread, one process with two threads, and two processes (torchrun, gloo)
# with one thread each, on SmolLM2 as benchmarks/setup.sh builds it, with the grid's protocol
# (32 calibration windows of 512 tokens, seed 0, the first 64 evaluation windows): one shot of
# 50% unstructured and one of 10% rows and columns (3 low-rank steps, the default). A record per
# run in benchmarks/records/ranks/; one whose record exists is skipped. Run it alone on the machine.
#   benchmarks/setup.sh && benchmarks/ranks.sh
set -euo pipefail
cd "$(dirname "$0")/.."
out=benchmarks/records/ranks
mkdir -p "$out"
a=benchmarks/assets
common=(--model "$a/smollm2-135m-instruct" --train-file "$a/brown/train.txt"
        --test-file "$a/brown/test.txt" --nsamples 32 --seqlen 512 --eval-windows 64 --seed 0
        --skip-dense-eval)
declare -A runs=(
  [unstructured-50]="--structure unstructured --sparsity 0.5 --shots 1 --max-correlate 1"
  [rowcol-10]="--structure rowcol --sparsity 0.1 --shots 1")
for name in rowcol-10 unstructured-50; do
  for how in 1x1 1x2 2x1; do
    json=$out/$name-$how.json
    [ -f "$json" ] && continue
    echo "== $name $how"
    case $how in
      1x1) launch=(env OMP_NUM_THREADS=1 python3 run_opt.py) ;;
      1x2) launch=(env OMP_NUM_THREADS=2 python3 run_opt.py) ;;
      2x1) launch=(env OMP_NUM_THREADS=1 torchrun --nproc-per-node 2 run_opt.py) ;;
    esac
    # shellcheck disable=SC2086
    "${launch[@]}" "${common[@]}" ${runs[$name]} --json "$json" > "$out/$name-$how.log" 2>&1
  done
done

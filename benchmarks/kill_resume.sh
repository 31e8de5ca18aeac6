#!/bin/bash
# A real SIGKILL of a run on SmolLM2 mid-run, resumed, against the same run uninterrupted.
# Needs benchmarks/setup.sh first. Writes benchmarks/records/kill-resume/: a.txt (the uninterrupted run),
# b1.txt (the killed one), b2.txt (its resumption), kill.txt (the summary).
cd "$(dirname "$0")/.." && mkdir -p benchmarks/records/kill-resume/run
export OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1
ARGS="--model ${MODEL:-benchmarks/assets/smollm2-135m-instruct} --train-file benchmarks/assets/brown/train.txt --test-file benchmarks/assets/brown/test.txt --nsamples 4 --seqlen 256 --eval-windows 2 --skip-dense-eval --method kobd --structure unstructured --sparsity 0.3 --shots 3"
rm -rf benchmarks/records/kill-resume/run/*
python run_opt.py $ARGS --checkpoint benchmarks/records/kill-resume/run/ck-a --save benchmarks/records/kill-resume/run/out-a > benchmarks/records/kill-resume/run/a.log 2>&1
python run_opt.py $ARGS --checkpoint benchmarks/records/kill-resume/run/ck-b --save benchmarks/records/kill-resume/run/out-b > benchmarks/records/kill-resume/run/b1.log 2>&1 &
PID=$!
until grep -q "shot 1/3:" benchmarks/records/kill-resume/run/b1.log 2>/dev/null; do sleep 1; done
sleep 20                                   # well into shot 2
kill -9 $PID; wait $PID; echo "killed with status $?" | tee benchmarks/records/kill-resume/run/kill.txt
tr "\r" "\n" < benchmarks/records/kill-resume/run/b1.log | grep "^shot" | tee -a benchmarks/records/kill-resume/run/kill.txt
python run_opt.py $ARGS --checkpoint benchmarks/records/kill-resume/run/ck-b --save benchmarks/records/kill-resume/run/out-b --resume > benchmarks/records/kill-resume/run/b2.log 2>&1
grep "^resuming\|^shot\|perplexity" benchmarks/records/kill-resume/run/b2.log | tee -a benchmarks/records/kill-resume/run/kill.txt
python - <<'PY' | tee -a benchmarks/records/kill-resume/run/kill.txt
from safetensors.torch import load_file
a, b = load_file("benchmarks/records/kill-resume/run/out-a/model.safetensors"), load_file("benchmarks/records/kill-resume/run/out-b/model.safetensors")
same = a.keys() == b.keys() and all((a[k] == b[k]).all() and a[k].dtype == b[k].dtype for k in a)
print("identical to the bit:", bool(same), len(a), "tensors")
PY
for f in a.log b1.log b2.log kill.txt; do      # the whole logs, unedited, next to the script's
  cp "benchmarks/records/kill-resume/run/$f" "benchmarks/records/kill-resume/${f%.*}.txt"
done

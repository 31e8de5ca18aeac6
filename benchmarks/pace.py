"""One shot of LLM Surgeon against SparseGPT, timed in turns on the same cores: 50% unstructured
on the grid's protocol (SmolLM2-135M-Instruct as benchmarks/setup.sh builds it, 32 calibration
windows of 512 tokens of Brown train, seed 0, the first 64 test windows of 512), one thread a
run, the two alternating (S G, then G S, ...). Seconds are each run's prune stage (LLM Surgeon:
curvature, costs, updates; SparseGPT: its calibration passes and updates); the record keeps every
run's and the medians.

    python benchmarks/pace.py --rounds 2 --json benchmarks/records/pace/unstructured-50.json
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
A = "benchmarks/assets"
PROTOCOL = ["--model", f"{A}/smollm2-135m-instruct", "--train-file", f"{A}/brown/train.txt",
            "--test-file", f"{A}/brown/test.txt", "--nsamples", "32", "--seqlen", "512",
            "--seed", "0", "--eval-windows", "64", "--skip-dense-eval"]
RUNS = {"surgeon": ["run_opt.py", "--method", "surgeon", "--structure", "unstructured",
                    "--sparsity", "0.5", "--shots", "1", "--max-correlate", "1"],
        "sparsegpt": ["benchmarks/peers/sparsegpt_wanda.py", "--method", "sparsegpt",
                      "--structure", "unstructured", "--sparsity", "0.5"]}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--json", required=True)
    args = p.parse_args()
    import run_opt
    start = run_opt.provenance()
    runs = {name: [] for name in RUNS}
    names = list(RUNS)
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for name in names if r % 2 == 0 else names[::-1]:
                out = os.path.join(tmp, f"{name}-{r}.json")
                cmd = [sys.executable, *RUNS[name][:1], *PROTOCOL, *RUNS[name][1:], "--json", out]
                print(f"round {r + 1}: {name}", flush=True)
                subprocess.run(cmd, cwd=ROOT, check=True, env={**os.environ,
                                                               "OMP_NUM_THREADS": "1"},
                               stdout=subprocess.DEVNULL)
                with open(out) as f:
                    record = json.load(f)
                runs[name].append({"seconds": record["seconds"]["prune"],
                                   "ppl": record["ppl_pruned"],
                                   "shot_seconds": (record.get("shots") or [{}])[0].get("seconds"),
                                   "load_average": record["provenance"].get("load_average")})
                print(f"  prune {runs[name][-1]['seconds']:.1f} s, ppl {record['ppl_pruned']:.3f}",
                      flush=True)
    result = {name: {"seconds": statistics.median(x["seconds"] for x in rs),
                     "ppl": rs[0]["ppl"], "runs": rs} for name, rs in runs.items()}
    ratio = result["surgeon"]["seconds"] / result["sparsegpt"]["seconds"]
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"provenance": {**start, "end_load_average": os.getloadavg(), "threads": 1,
                                  "command": "python benchmarks/pace.py " + " ".join(sys.argv[1:])},
                   **result, "surgeon_over_sparsegpt": ratio}, f, indent=1)
    print(f"LLM Surgeon {result['surgeon']['seconds']:.0f} s (ppl {result['surgeon']['ppl']:.2f}), "
          f"SparseGPT {result['sparsegpt']['seconds']:.0f} s (ppl "
          f"{result['sparsegpt']['ppl']:.2f}): {ratio:.2f}x")


if __name__ == "__main__":
    main()

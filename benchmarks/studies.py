"""Studies behind the defaults, on a reduced protocol (fewer calibration and evaluation windows
than the grid, to fit a 2-core CPU; each study says which). Each run is a run_opt.py call with a
JSON record and a log in benchmarks/records/studies/STUDY/; a run whose record exists is skipped, and a
killed run resumes from its checkpoint, as in grid.py.

    python benchmarks/studies.py max-correlate   # on what benchmarks/setup.sh builds
    python benchmarks/studies.py damp-g          # lambda_G for rows and columns
    python benchmarks/studies.py damp-costs      # damped or undamped A, G in the rowcol costs
    python benchmarks/studies.py lora            # interleaved low-rank updates, with and without
    python benchmarks/studies.py lora-steps      # how many low-rank steps a shot
    python benchmarks/studies.py calibration     # 8, 32 or 128 calibration windows
    python benchmarks/studies.py dtype           # float32 or bfloat16 weights
    python benchmarks/studies.py units-order     # heads and MLP units by cost or cost per weight
    python benchmarks/studies.py STUDY --table-only

max-correlate: one 10% unstructured shot of LLM Surgeon (the first shot of the paper's 5-shot
schedule to 50%) with 1 weight row a chunk against the paper's 2000 weights a chunk.
damp-g: 20% rows and columns at 5% a shot (4 shots) and at the paper's 1.25% a shot (16 shots),
lambda_G in {0.01, 0.1, 1}, evaluated after every shot.
damp-costs: the same two schedules with the damped A_hat, G_hat in the row and column cost forms
(--damp-costs) and with the undamped A, G as the authors' code (--no-damp-costs).
lora: 30% rows and columns (6 shots) and 50% unstructured (2 shots, and the paper's 5, about an
hour a run on this CPU) with and without 3 low-rank steps a shot (the authors' 3 sequences a shot).
lora-steps: 10% rows and columns in 2 shots (the README's example) with 0, 3, 10 or 30 low-rank
steps a shot (its 3-step run is the README example's record, copied).
dtype: the grid's protocol with float32 and with bfloat16 weights: 10% rows and columns in 2
shots (3 low-rank steps a shot, the default) and 2:4 in one shot.
units-order: the grid's protocol, heads and MLP units to 30% in 6 shots of 5% (as the grid's
surgeon-units-30-shots-6), taken in order of cost or of cost per weight removed; the models at
10, 20 and 30% saved compacted in out/ (for benchmarks/latency.py).
calibration: the grid's protocol (64 evaluation windows) but 8, 32 or 128 calibration windows of
512 tokens, for 2:4 in the paper's 5 shots (as the grid's surgeon-2:4: its 32-window run and the
dense run are the grid's records, copied) and for 10% rows and columns in one shot.
"""
import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from grid import (add_data_args, common_args, data_args, load_records, run_entries,  # noqa: E402
                  stage_seconds)

SURGEON = ["--method", "surgeon"]
DENSE = {"dense": ["--sparsity", "0"]}                     # the same evaluation windows, unpruned
STUDIES = {
    "max-correlate": {
        "protocol": {"nsamples": 8, "eval_windows": 32},
        "runs": DENSE | {f"mc-{k}": SURGEON + ["--structure", "unstructured", "--sparsity", "0.1",
                                       "--shots", "1", "--max-correlate", str(k)]
                 for k in (1, 2000)},
    },
    "damp-g": {
        "protocol": {"nsamples": 8, "eval_windows": 16},
        "runs": DENSE | {f"shots-{shots}-damp-g-{g}": SURGEON + [
            "--structure", "rowcol", "--sparsity", "0.2", "--shots", str(shots), "--damp-g", g,
            "--eval-every", "1", "--lora-steps", "0"]
            for shots in (4, 16) for g in ("0.01", "0.1", "1")},
    },
    "damp-costs": {
        "protocol": {"nsamples": 8, "eval_windows": 16},
        "runs": DENSE | {f"shots-{shots}-{costs}": SURGEON + [
            "--structure", "rowcol", "--sparsity", "0.2", "--shots", str(shots),
            f"--{costs}", "--eval-every", "1", "--lora-steps", "0"] for shots in (4, 16)
            for costs in ("damp-costs", "no-damp-costs")},
    },
    "lora": {
        "protocol": {"nsamples": 8, "eval_windows": 32},
        "runs": DENSE | {f"rowcol-30-lora-{steps}": SURGEON + [
            "--structure", "rowcol", "--sparsity", "0.3", "--shots", "6", "--damp-g", "0.1",
            "--lora-steps", str(steps)] for steps in (0, 3)} | {
            f"unstructured-50-lora-{steps}": SURGEON + [
            "--structure", "unstructured", "--sparsity", "0.5", "--shots", "2",
            "--lora-steps", str(steps)] for steps in (0, 3)} | {
            f"unstructured-50-shots-5-lora-{steps}": SURGEON + [
            "--structure", "unstructured", "--sparsity", "0.5", "--shots", "5",
            "--lora-steps", str(steps)] for steps in (0, 3)},
    },
    "lora-steps": {
        "protocol": {"nsamples": 8, "eval_windows": 16},
        "runs": DENSE | {f"rowcol-10-lora-{steps}": SURGEON + [
            "--structure", "rowcol", "--sparsity", "0.1", "--shots", "2", "--eval-every", "1",
            "--lora-steps", str(steps)] for steps in (0, 3, 10, 30)},
    },
    "calibration": {
        "protocol": {"nsamples": 32, "eval_windows": 64},
        "runs": DENSE | {f"2:4-windows-{n}": SURGEON + [
            "--structure", "2:4", "--sparsity", "0.5", "--shots", "5", "--max-correlate", "1",
            "--nsamples", str(n)] for n in (8, 32, 128)} | {
            f"rowcol-10-windows-{n}": SURGEON + [
            "--structure", "rowcol", "--sparsity", "0.1", "--shots", "1", "--lora-steps", "0",
            "--nsamples", str(n)] for n in (128, 8, 32)},
    },
    "units-order": {
        "protocol": {"nsamples": 32, "eval_windows": 64},
        "runs": {f"units-30-order-{order}": SURGEON + [
            "--structure", "units", "--sparsity", "0.3", "--shots", "6", "--lora-steps", "0",
            "--unit-order", order, "--compact", "--eval-every", "1", "--save-every", "2",
            "--save", f"out/units-30-order-{order}"] for order in ("cost", "per-weight")},
    },
    "dtype": {
        "protocol": {"nsamples": 32, "eval_windows": 64},
        "runs": {f"{name}-{dtype}": run + ["--dtype", dtype] for dtype in ("float32", "bfloat16")
                 for name, run in (("dense", ["--sparsity", "0"]),
                                   ("rowcol-10", SURGEON + ["--structure", "rowcol",
                                                            "--sparsity", "0.1", "--shots", "2",
                                                            "--eval-every", "1"]),
                                   ("2:4", SURGEON + ["--structure", "2:4", "--sparsity", "0.5",
                                                      "--shots", "1", "--max-correlate", "1"]))},
    },
}


def table(study, folder):
    """One line per run: perplexity after each evaluated shot, calibration windows, seconds of
    each stage, the curvature's seconds per labelled calibration token and shot, peak."""
    lines = [f"# Study: {study}", "", "| run | perplexity | sparsity | windows | seconds of pruning "
             "| curvature ms per token | peak MiB | per shot (target: perplexity) |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in sorted(load_records(folder).items()):
        split, cfg = stage_seconds(r["shots"]), r["settings"]
        seconds = ", ".join(f"{k} {v:.0f}" for k, v in split.items() if k != "checkpoint")
        tokens = cfg["nsamples"] * (cfg["seqlen"] - 1) * len(r["shots"])     # labelled, all shots
        per_token = f"{1000 * split['curvature'] / tokens:.2f}" if "curvature" in split else ""
        shots = ", ".join(f"{s['target']:.4g}: {s['ppl']:.2f}" for s in r["shots"] if "ppl" in s)
        lines.append(f"| {name} | {r['ppl_pruned']:.2f} | {r['sparsity']:.1%} | {cfg['nsamples']} "
                     f"| {seconds} | {per_token} | {max(r['peak_memory_mb'].values()):.0f} | "
                     f"{shots} |")
    with open(folder.rstrip("/") + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("study", choices=list(STUDIES))
    add_data_args(p)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--only", nargs="*", help="run only these runs of the study")
    p.add_argument("--table-only", action="store_true")
    args = p.parse_args()
    study = STUDIES[args.study]
    folder = os.path.join(HERE, "records", "studies", args.study)
    if not args.table_only:
        for key, value in study["protocol"].items():
            setattr(args, key, value)
        run_entries(study["runs"], folder, common_args(data_args(args)), args.only)
    table(args.study, folder)


if __name__ == "__main__":
    main()

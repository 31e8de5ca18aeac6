"""The benchmark grid: dense; magnitude, L-OBD, K-OBD and LLM Surgeon at 50% unstructured, 2:4,
and 20% and 30% rows and columns, each run through run_opt.py; SparseGPT and Wanda at 50%
unstructured and 2:4 through benchmarks/peers/sparsegpt_wanda.py. One JSON record per run goes to a results
folder (a run whose record exists is skipped, a killed run resumes from its checkpoint), then
FOLDER.md is written from all records there.

    benchmarks/setup.sh && python benchmarks/grid.py             # this project's CPU protocol
    python benchmarks/grid.py --model facebook/opt-125m --nsamples 128 --seqlen 2048 \\
        --results benchmarks/opt125m-wikitext                     # the paper's, with a hub
    python benchmarks/grid.py --table-only                        # only the table

Without --model the runs use what benchmarks/setup.sh builds (SmolLM2-135M-Instruct, Brown
Corpus); with a --model and no text files, WikiText-2. Defaults are the CPU protocol: 32
calibration windows of 512 tokens, seed 0, the first 64 evaluation windows.
Rows and columns follow the paper's schedule, 1.25% a shot: LLM Surgeon and K-OBD in 24 shots to
30%, evaluated after every 4th shot (shots 8, 16, 24 give 10, 20, 30%). The faster variants at 5% a shot are kept as
surgeon-rowcol-30-shots-6 (6 shots) and kobd-rowcol-30-shots-3 (3 shots of 10%);
surgeon-rowcol-30-lora adds 3 interleaved low-rank steps a shot (rank 8, lr 1e-4). L-OBD takes
one shot at 20% and one at 30%. Element runs: LLM Surgeon in the paper's 5 shots, a row at a
time (max_correlate 1), the others in one shot.
"""
import argparse
import glob
import json
import os
import platform
import shutil
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
ASSETS = "benchmarks/assets"                   # what benchmarks/setup.sh builds, from the root


def repo_path(path):
    """A path as the runs see it from the repository root, where they run: relative inside the
    repository (so that records name no folder of this machine), absolute outside it."""
    full = os.path.abspath(path)
    return os.path.relpath(full, ROOT) if os.path.commonpath([full, ROOT]) == ROOT else full


# name: run_opt.py arguments. Order = priority: what matters most runs first.
GRID = {
    "dense": ["--sparsity", "0"],
    "surgeon-rowcol-30": ["--method", "surgeon", "--structure", "rowcol", "--sparsity", "0.3",
                          "--shots", "24", "--eval-every", "4", "--lora-steps", "0"],
    "surgeon-rowcol-30-shots-6": ["--method", "surgeon", "--structure", "rowcol", "--sparsity", "0.3",
                          "--shots", "6", "--damp-g", "0.1", "--compact", "--eval-every", "1",
                          "--lora-steps", "0"],
    "surgeon-unstructured-50": ["--method", "surgeon", "--structure", "unstructured",
                                "--sparsity", "0.5", "--shots", "5", "--max-correlate", "1"],
    "surgeon-2:4": ["--method", "surgeon", "--structure", "2:4", "--sparsity", "0.5", "--shots",
                    "5", "--max-correlate", "1"],
    "magnitude-unstructured-50": ["--method", "magnitude", "--structure", "unstructured",
                                  "--sparsity", "0.5", "--shots", "1"],
    "magnitude-2:4": ["--method", "magnitude", "--structure", "2:4", "--sparsity", "0.5",
                      "--shots", "1"],
    "magnitude-rowcol-20": ["--method", "magnitude", "--structure", "rowcol", "--sparsity", "0.2",
                            "--shots", "1"],
    "magnitude-rowcol-30": ["--method", "magnitude", "--structure", "rowcol", "--sparsity", "0.3",
                            "--shots", "1"],
    "kobd-unstructured-50": ["--method", "kobd", "--structure", "unstructured", "--sparsity",
                             "0.5", "--shots", "1"],
    "kobd-2:4": ["--method", "kobd", "--structure", "2:4", "--sparsity", "0.5", "--shots", "1"],
    "kobd-rowcol-30": ["--method", "kobd", "--structure", "rowcol", "--sparsity", "0.3",
                       "--shots", "24", "--eval-every", "4"],
    "surgeon-rowcol-30-lora": ["--method", "surgeon", "--structure", "rowcol", "--sparsity", "0.3",
                               "--shots", "24", "--eval-every", "4", "--lora-steps", "3"],
    "surgeon-rowcol-30-lora-10": ["--method", "surgeon", "--structure", "rowcol", "--sparsity",
                                  "0.3", "--shots", "24", "--eval-every", "4", "--lora-steps", "10",
                                  "--compact", "--save", "out/surgeon-rowcol-30-lora-10"],
    "kobd-rowcol-30-shots-3": ["--method", "kobd", "--structure", "rowcol", "--sparsity", "0.3",
                               "--shots", "3", "--eval-every", "1"],   # (once with --damp-g 0.1,
                                                                       # which K-OBD does not use)
    "lobd-unstructured-50": ["--method", "lobd", "--structure", "unstructured", "--sparsity",
                             "0.5", "--shots", "1"],
    "lobd-2:4": ["--method", "lobd", "--structure", "2:4", "--sparsity", "0.5", "--shots", "1"],
    "lobd-rowcol-30": ["--method", "lobd", "--structure", "rowcol", "--sparsity", "0.3",
                       "--shots", "1"],
    "lobd-rowcol-20": ["--method", "lobd", "--structure", "rowcol", "--sparsity", "0.2",
                       "--shots", "1"],
    # heads and MLP units (--structure units), the paper's schedule to 30%, the models saved;
    # surgeon-units-20 is its first 16 shots again, saving the models of 10% and 20%, and
    # surgeon-rowcol-30-shots-6-saved the 6-shot rows-and-columns run again, saving its 10%, 20%
    # and 30% models (for latency.py)
    "surgeon-units-30": ["--method", "surgeon", "--structure", "units", "--sparsity", "0.3",
                         "--shots", "24", "--eval-every", "4", "--lora-steps", "3", "--compact",
                         "--save", "out/surgeon-units-30"],
    "surgeon-units-20": ["--method", "surgeon", "--structure", "units", "--sparsity", "0.2",
                         "--shots", "16", "--eval-every", "4", "--lora-steps", "3", "--compact",
                         "--save", "out/surgeon-units-20", "--save-every", "8"],
    "surgeon-rowcol-30-shots-6-saved": ["--method", "surgeon", "--structure", "rowcol",
                                        "--sparsity", "0.3", "--shots", "6", "--damp-g", "0.1",
                                        "--compact", "--eval-every", "1", "--lora-steps", "0",
                                        "--save", "out/surgeon-rowcol-30-shots-6",
                                        "--save-every", "2"],
    "surgeon-units-30-shots-6": ["--method", "surgeon", "--structure", "units", "--sparsity",
                                 "0.3", "--shots", "6", "--damp-g", "0.1", "--lora-steps", "0",
                                 "--compact", "--eval-every", "1", "--save",
                                 "out/surgeon-units-30-shots-6"],
    # the same 6 shots scoring a unit by the sum of its lines' costs instead of its cheapest cut
    "surgeon-units-30-shots-6-lines": ["--method", "surgeon", "--structure", "units",
                                       "--sparsity", "0.3", "--shots", "6", "--damp-g", "0.1",
                                       "--lora-steps", "0", "--compact", "--eval-every", "1",
                                       "--unit-cost", "lines", "--save",
                                       "out/surgeon-units-30-shots-6-lines"],
    "kobd-units-30": ["--method", "kobd", "--structure", "units", "--sparsity", "0.3",
                      "--shots", "24", "--eval-every", "4", "--compact", "--save",
                      "out/kobd-units-30"],
    "kobd-units-30-shots-3": ["--method", "kobd", "--structure", "units", "--sparsity", "0.3",
                              "--shots", "3", "--eval-every", "1", "--compact", "--save",
                              "out/kobd-units-30-shots-3"],
    # quality against time: LLM Surgeon in fewer shots than the paper's 5 (benchmarks/figure.py)
    **{f"surgeon-{name}-shots-{k}": ["--method", "surgeon", "--structure", structure,
                                     "--sparsity", "0.5", "--shots", str(k)]
       for name, structure in (("unstructured-50", "unstructured"), ("2:4", "2:4"))
       for k in (1, 2, 3)},
}
# name: benchmarks/peers/sparsegpt_wanda.py arguments (SparseGPT and Wanda, written from their papers).
PEERS = {f"{method}-{name}": ["--method", method, "--structure", structure, "--sparsity", "0.5"]
         for method in ("sparsegpt", "wanda")
         for name, structure in (("unstructured-50", "unstructured"), ("2:4", "2:4"))}
# name: benchmarks/peers/slicegpt.py arguments. SliceGPT removing 10/20/30% of the blocks' linear
# weights (its shortcut matrices counted as kept), and with as many parameters in the whole
# model as rows and columns pruned to 10/20/30% leave (-params); the 30% models are saved, the
# 10% and 20% --remove ones by their -saved runs (the same slicings again, for latency.py).
SLICEGPT = {f"slicegpt-rowcol-{p}{suffix}": [flag, f"0.{p // 10}", "--compact-latency"] +
            (["--save", f"out/slicegpt-rowcol-{p}{suffix}"] if p == 30 else [])
            for suffix, flag in (("", "--remove"), ("-params", "--match-rowcol"))
            for p in (10, 20, 30)}
SLICEGPT |= {f"slicegpt-rowcol-{p}-saved": ["--remove", f"0.{p // 10}", "--compact-latency",
                                            "--save", f"out/slicegpt-rowcol-{p}"]
             for p in (10, 20)}
COLUMNS = [("50% unstructured", "unstructured-50"), ("2:4", "2:4"), ("10% rows+cols", "rowcol-10"),
           ("20% rows+cols", "rowcol-20"), ("30% rows+cols", "rowcol-30")]
METHODS = [("magnitude", "magnitude"), ("Wanda", "wanda"), ("SparseGPT", "sparsegpt"),
           ("SliceGPT", "slicegpt"), ("L-OBD", "lobd"), ("K-OBD", "kobd"),
           ("LLM Surgeon", "surgeon")]
VARIANTS = [("K-OBD, 10% a shot", "kobd", "-shots-3"),          # rows and columns, faster
            ("LLM Surgeon, 5% a shot", "surgeon", "-shots-6"),
            ("LLM Surgeon, 3 low-rank steps a shot", "surgeon", "-lora"),
            ("LLM Surgeon, 10 low-rank steps a shot", "surgeon", "-lora-10"),
            ("SliceGPT, LLM Surgeon's parameter count", "slicegpt", "-params")]


def common_args(args):
    """run_opt.py arguments shared by every run of a grid or study."""
    model = repo_path(args.model) if os.path.exists(args.model) else args.model     # or a hub id
    common = ["--model", model, "--nsamples", str(args.nsamples), "--seqlen",
              str(args.seqlen), "--seed", "0", "--eval-windows", str(args.eval_windows),
              "--skip-dense-eval"]
    common += ["--train-file", repo_path(args.train_file)] if args.train_file else []
    common += ["--test-file", repo_path(args.test_file)] if args.test_file else []
    return common


def run_entries(entries, results, common, only=None, script="run_opt.py"):
    """Run each entry (name: arguments of `script`) whose JSON record is not in `results` yet;
    a killed run_opt.py run resumes from its checkpoint."""
    os.makedirs(results, exist_ok=True)
    for name, extra in entries.items():
        if only and name not in only:
            continue
        out = os.path.join(results, name.replace(":", "") + ".json")
        if os.path.exists(out):
            continue
        print(f"== {name}", flush=True)
        checkpoint = out[:-5] + ".checkpoint"              # a killed run resumes from here
        resume = ["--resume"] if os.path.exists(os.path.join(checkpoint, "checkpoint.pt")) else []
        keep = ["--checkpoint", repo_path(checkpoint), *resume] if script == "run_opt.py" else []
        cmd = [sys.executable, script, *common, *extra, "--json", repo_path(out), *keep]
        with open(out[:-5] + ".log", "a" if resume else "w") as log:
            done = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        if done.returncode:
            print(f"   failed, see {out[:-5]}.log", flush=True)
        else:
            shutil.rmtree(checkpoint, ignore_errors=True)


def run(args):
    for name in GRID:                                   # the table is rewritten after each run
        run_entries({name: GRID[name]}, args.results, common_args(args), args.only)
        write_table(args.results)
    run_entries(PEERS, args.results, common_args(args), args.only,
                "benchmarks/peers/sparsegpt_wanda.py")
    run_entries(SLICEGPT, args.results, common_args(args), args.only, "benchmarks/peers/slicegpt.py")
    write_table(args.results)


def load_records(folder):
    records = {}
    for path in glob.glob(os.path.join(folder, "*.json")):
        with open(path) as f:
            records[os.path.basename(path)[:-5]] = json.load(f)
    return records


def stage_seconds(shots):
    """{stage: seconds summed over these shots}."""
    split = {}
    for shot in shots:
        for k, v in shot["seconds"].items():
            split[k] = split.get(k, 0) + v
    return split


def shot_seconds(shots):
    """Seconds of pruning in these shots: every stage but the checkpoints (evaluations are not
    shot stages)."""
    return sum(v for k, v in stage_seconds(shots).items() if k != "checkpoint")


def cell(records, method, column, variant=""):
    """(perplexity, achieved sparsity, seconds of pruning) or None. Rows and columns at 10% and
    20%: a run of its own, or the evaluated shot of the 30% run that reached it."""
    r = records.get(f"{method}-{column.replace(':', '')}{variant}")
    if not r and column in ("rowcol-10", "rowcol-20"):
        shots = (records.get(f"{method}-rowcol-30{variant}") or {"shots": []})["shots"]
        for t, s in enumerate(shots):
            if "ppl" in s and abs(s["target"] - int(column[-2:]) / 100) < 1e-3:
                return s["ppl"], s["sparsity"], shot_seconds(shots[:t + 1])
    return (r["ppl_pruned"], r["sparsity"], shot_seconds(r["shots"])) if r else None


def allocation(layers):
    """Markdown table of per-layer sparsity: one line per block, one column per projection."""
    blocks = {}
    for name, sparsity in layers.items():
        prefix, _, kind = name.rpartition(".")
        block = prefix.rpartition(".")[0] if kind.endswith("proj") or kind.startswith("fc") \
            else prefix
        blocks.setdefault(block, {})[kind] = sparsity
    kinds = list(dict.fromkeys(k for b in blocks.values() for k in b))
    lines = ["| block | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds)]
    for block, row in blocks.items():
        lines.append(f"| {block.rpartition('.')[2]} | " +
                     " | ".join(f"{100 * row[k]:.0f}" if k in row else "" for k in kinds) + " |")
    return lines


def write_table(folder):
    records = load_records(folder)
    if not records:
        return
    some = next(iter(records.values()))
    s = some["settings"]
    lines = [f"# Benchmark grid: {os.path.basename(folder.rstrip('/'))}", "",
             f"Model `{s['model']}`, calibration {s['nsamples']} x {s['seqlen']} tokens from "
             f"`{s['train_file'] or 'WikiText-2'}` (seed {s['seed']}), evaluation on the first "
             f"{s['eval_windows']} windows of `{s['test_file'] or 'WikiText-2 test'}`; "
             f"device {s['device']}, torch {some['versions']['torch']}, "
             f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}).", "",
             "Perplexity (achieved sparsity, pruning time):", "",
             "| method | " + " | ".join(c for c, _ in COLUMNS) + " |",
             "|---|" + "---|" * len(COLUMNS)]
    dense = records.get("dense")
    lines.append(f"| dense | {dense['ppl_dense']:.2f} |" + " |" * (len(COLUMNS) - 1)
                 if dense else "| dense | not run |" + " |" * (len(COLUMNS) - 1))
    for label, method, variant in [(label, method, "") for label, method in METHODS] + VARIANTS:
        cells = []
        for _, column in COLUMNS:
            c = cell(records, method, column, variant)
            rows = column.startswith("rowcol")
            cells.append(f"{c[0]:.2f} ({c[1]:.1%}, {c[2]:.0f} s)" if c else
                         "removes no rows" if method in ("sparsegpt", "wanda") and rows else
                         "" if (variant or method == "slicegpt") and not rows else "not run")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "Seconds of pruning: curvature, costs, updates and low-rank steps of every shot "
              "(SliceGPT: its slicing; evaluations and checkpoints not counted). Settings of each "
              "run are in its JSON record.", ""]
    for name in [*GRID, *PEERS, *SLICEGPT]:
        r = records.get(name.replace(":", ""))
        if r and r.get("shots"):
            split = stage_seconds(r["shots"])
            mc = r["settings"].get("max_correlate")
            shots = r["settings"].get("shots", 1)
            lines.append(f"- {name}: {shots} shot{'s' if shots > 1 else ''}"
                         + (f", max_correlate {mc}" if mc else "") + "; seconds " +
                         ", ".join(f"{k} {v:.0f}" for k, v in split.items()) +
                         f"; peak memory {max(r['peak_memory_mb'].values()):.0f} MiB")
    for label, method in METHODS:
        r = records.get(f"{method}-rowcol-30")
        if r and r["layers"]:
            lines += ["", f"Sparsity per layer (percent zero) of {label} at 30% rows and columns:",
                      "", *allocation(r["layers"])]
    with open(folder.rstrip("/") + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")


def add_data_args(p):
    """--model, --train-file, --test-file; defaults: what benchmarks/setup.sh builds."""
    p.add_argument("--model", help=f"hub id or folder (default: {ASSETS}/smollm2-135m-instruct "
                                   "with the Brown Corpus text that setup.sh builds there)")
    p.add_argument("--train-file", help="calibration text (default: WikiText-2 train)")
    p.add_argument("--test-file", help="evaluation text (default: WikiText-2 test)")


def data_args(args):
    """Without --model, the assets of benchmarks/setup.sh."""
    if args.model is None:
        folder = os.path.join(ROOT, ASSETS)
        args.model = os.path.join(folder, "smollm2-135m-instruct")
        args.train_file = args.train_file or os.path.join(folder, "brown", "train.txt")
        args.test_file = args.test_file or os.path.join(folder, "brown", "test.txt")
        if not os.path.isdir(args.model):
            sys.exit(f"{args.model} is not there: run benchmarks/setup.sh first, or pass --model")
    return args


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_data_args(p)
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=64)
    p.add_argument("--results", default=os.path.join(HERE, "records", "smollm2-brown"),
                   help="folder of JSON records; the table goes to FOLDER.md")
    p.add_argument("--only", nargs="*", help="run only these grid entries")
    p.add_argument("--table-only", action="store_true")
    args = p.parse_args()
    if args.table_only:
        write_table(args.results)
    else:
        run(data_args(args))


if __name__ == "__main__":
    main()

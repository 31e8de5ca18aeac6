"""Perplexity against sparsity for rows and columns, one curve per method, log scale (as the
paper's figures), from a grid's JSON records: every evaluated shot and every run's end point.
Writes FOLDER-rowcol.png and FOLDER-rowcol.json (the points drawn).

    python benchmarks/figure.py                       # benchmarks/smollm2-brown
    python benchmarks/figure.py --results benchmarks/opt125m-wikitext
"""
import argparse
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from grid import METHODS, load_records  # noqa: E402


def points(records, method):
    """Sorted (sparsity, perplexity) of every evaluated state of `method` with rows and columns,
    starting at the dense model."""
    found = {}
    dense = records.get("dense")
    if dense:
        found[0.0] = dense["ppl_dense"]
    for name, r in records.items():
        if not name.startswith(f"{method}-rowcol-"):
            continue
        for shot in r["shots"]:
            if "ppl" in shot:
                found[round(shot["sparsity"], 4)] = shot["ppl"]
        found[round(r["sparsity"], 4)] = r["ppl_pruned"]
    return sorted(found.items())


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--results", default=os.path.join(HERE, "smollm2-brown"))
    args = p.parse_args()
    records = load_records(args.results)
    curves = {label: points(records, method) for label, method in METHODS}
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for (label, curve), marker in zip(curves.items(), "v^so"):
        if len(curve) > 1:
            x, y = zip(*curve)
            ax.plot([100 * s for s in x], y, marker=marker, label=label)
    ax.set_yscale("log")
    ax.set_xlabel("sparsity of the pruned layers (%), rows and columns")
    ax.set_ylabel("test perplexity")
    some = next(iter(records.values()))["settings"]
    test = some["test_file"]
    data = os.path.join(*os.path.normpath(test).split(os.sep)[-2:]) if test else "WikiText-2"
    ax.set_title(f"{os.path.basename(some['model'].rstrip('/'))}, {data}", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = args.results.rstrip("/") + "-rowcol"
    fig.savefig(out + ".png", dpi=120)
    with open(out + ".json", "w") as f:
        json.dump({label: [{"sparsity": s, "ppl": v} for s, v in curve]
                   for label, curve in curves.items()}, f, indent=1)
    print(f"wrote {out}.png and {out}.json")


if __name__ == "__main__":
    main()

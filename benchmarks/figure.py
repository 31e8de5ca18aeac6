"""Figures from a grid's JSON records, with the points drawn written next to them as JSON:

- FOLDER-rowcol.png: perplexity against sparsity for rows and columns, log scale (as the paper's
  figures), every evaluated shot: one curve per multi-shot run (with or without low-rank
  updates), and one per method for its one-shot runs; a second panel zooms on the points below
  300 (a curve with at least two of them besides dense).
- FOLDER-quality-time.png: perplexity against seconds of pruning at 50% unstructured and at 2:4,
  every method; LLM Surgeon once per number of shots that has a record (NAME-shots-K runs).
- FOLDER-units.png: what structured pruning buys counted in parameters and in time: perplexity
  against the parameters left after compaction (heads and MLP units, every evaluated shot; rows
  and columns and SliceGPT, their compacted or sliced models), and against the forward pass's
  speed-up over dense, timed in turns (the records of benchmarks/latency.py in --latency).

    python benchmarks/figure.py                       # benchmarks/records/smollm2-brown
    python benchmarks/figure.py --results benchmarks/opt125m-wikitext
"""
import argparse
import glob
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from grid import METHODS, load_records, shot_seconds  # noqa: E402


def rowcol_curves(records):
    """{label: sorted [(sparsity, perplexity)]}, each starting at the dense model."""
    dense = records.get("dense")
    start = {0.0: dense["ppl_dense"]} if dense else {}
    curves = {}
    for label, method in METHODS:
        for name, r in sorted(records.items()):
            if not name.startswith(f"{method}-rowcol-"):
                continue
            shots, steps = r["settings"].get("shots", 1), r["settings"].get("lora_steps", 0)
            key = f"{label}, {shots} shots" if shots > 1 else f"{label}, one shot each"
            key += f", {steps} low-rank steps a shot" if steps else ""
            found = curves.setdefault(key, dict(start))
            for shot in r["shots"]:
                if "ppl" in shot:
                    found[round(shot["sparsity"], 4)] = shot["ppl"]
            found[round(r["sparsity"], 4)] = r["ppl_pruned"]
    return {key: sorted(found.items()) for key, found in curves.items()}


def quality_time(records, column):
    """{label: sorted [(seconds of pruning, perplexity)]} at one grid column."""
    curves = {}
    for label, method in METHODS:
        for name, r in records.items():
            if name == f"{method}-{column}" or name.startswith(f"{method}-{column}-shots-"):
                shots = r["settings"]["shots"]
                curves.setdefault(label, []).append((shot_seconds(r["shots"]), r["ppl_pruned"],
                                                     shots))
    return {label: sorted(points) for label, points in curves.items()}


def title(records):
    some = next(iter(records.values()))["settings"]
    test = some["test_file"]
    data = os.path.join(*os.path.normpath(test).split(os.sep)[-2:]) if test else "WikiText-2"
    return f"{os.path.basename(some['model'].rstrip('/'))}, {data}"


def rowcol_figure(records, out):
    """Left every curve (log scale); right, zoomed, the points below 300."""
    curves = rowcol_curves(records)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, zoom in zip(axes, (False, True)):
        for i, ((label, curve), marker) in enumerate(zip(curves.items(), "v^sodpx*")):
            if zoom:
                curve = [(s, v) for s, v in curve if v <= 300]
            if len(curve) > (2 if zoom else 1):
                x, y = zip(*curve)                                  # one colour a curve in both
                ax.plot([100 * s for s in x], y, marker=marker, label=label, markersize=4,
                        color=f"C{i}")
        ax.set_yscale("log")
        ax.set_xlabel("sparsity of the pruned layers (%), rows and columns")
        ax.set_ylabel("test perplexity")
        ax.set_title(title(records) + (", points below 300" if zoom else ""), fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out + ".png", dpi=120)
    with open(out + ".json", "w") as f:
        json.dump({label: [{"sparsity": s, "ppl": v} for s, v in curve]
                   for label, curve in curves.items()}, f, indent=1)


def quality_time_figure(records, out):
    columns = (("unstructured-50", "50% unstructured"), ("2:4", "2:4"))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    drawn = {}
    for ax, (column, heading) in zip(axes, columns):
        curves = quality_time(records, column.replace(":", ""))
        drawn[heading] = {label: [{"seconds": t, "ppl": v, "shots": k} for t, v, k in curve]
                          for label, curve in curves.items()}
        for (label, curve), marker in zip(curves.items(), "v^sodpx*"):
            x, y, shots = zip(*curve)
            ax.plot([max(t, 1) for t in x], y, marker=marker, label=label)
            if len(curve) > 1:
                for t, v, k in curve:
                    ax.annotate(f"{k} shot{'s' if k > 1 else ''}", (max(t, 1), v), fontsize=7,
                                textcoords="offset points", xytext=(4, 4))
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("seconds of pruning (one thread)")
        ax.set_ylabel("test perplexity")
        ax.set_title(f"{heading}; {title(records)}", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out + ".png", dpi=120)
    with open(out + ".json", "w") as f:
        json.dump(drawn, f, indent=1)


def schedule(r):
    """A multi-shot run's step and low-rank steps: '1.25% a shot, 3 low-rank steps' (24 shots to
    30%, or 16 to 20%)."""
    steps = r["settings"].get("lora_steps")
    return f"{100 * r['settings']['sparsity'] / r['settings']['shots']:g}% a shot" + \
        (f", {steps} low-rank steps" if steps else "") + \
        (f", {LINES}" if r["settings"].get("unit_cost") == "lines" else "")


def pruned_weights(r):
    """The pruned layers' weights; records written before run_opt kept that count: from the
    compacted model, which lost exactly the weights that units pruning removed."""
    return r.get("pruned_weights") or \
        (r["params_dense"] - r["params_compact"]) / (r["sparsity"] - r["sparsity_before"])


def units_points(records):
    """{label: sorted [(parameters, perplexity)]}: units runs at every evaluated shot, the
    parameters as compacted where the shot was saved (--save-every) or is the last, else the
    dense model's less the removed units' weights; rows and columns as compacted (saved shots and
    the last); SliceGPT as sliced. Runs of one schedule share a curve."""
    dense = records.get("dense")
    curves = {}
    for name, r in sorted(records.items()):
        if name.startswith("slicegpt-rowcol-"):
            curves.setdefault("SliceGPT", {})[r["params_compact"]] = r["ppl_pruned"]
        elif ("-units-" in name or "-rowcol-" in name) and "params_compact" in r:
            units = "-units-" in name
            label = f"{'LLM Surgeon' if name.startswith('surgeon') else 'K-OBD'}, " \
                    f"{'heads and MLP units' if units else 'rows and columns'}, {schedule(r)}"
            found = curves.setdefault(label, {})
            for s in r["shots"][:-1]:
                if "params_compact" in s:
                    found[s["params_compact"]] = s["ppl"]
                elif units and "ppl" in s:
                    found[r["params_dense"] - (s["sparsity"] - r["sparsity_before"])
                          * pruned_weights(r)] = s["ppl"]
            found[r["params_compact"]] = r["ppl_compact"]
    start = {dense["params_dense"]: dense["ppl_dense"]} if dense else {}
    return {label: sorted(({**start, **points} if "units" in label else points).items())
            for label, points in curves.items()}


def speed_points(folder):
    """{label: [(speed-up over dense, perplexity)]} from benchmarks/latency.py's records: each
    model against the dense one timed in turns with it (the median of the rounds' own ratios;
    older records: the ratio of the medians)."""
    points = {}
    for path in sorted(glob.glob(os.path.join(folder, "*.json"))):
        with open(path) as f:
            r = json.load(f)
        if "dense" not in r or "latency_ms" not in r["dense"]:
            continue
        for name, m in r.items():
            if isinstance(m, dict) and "latency_ms" in m and name != "dense":
                speedup = m["speedup"] if m.get("speedup_over") == "dense" else \
                    r["dense"]["latency_ms"] / m["latency_ms"]
                points.setdefault(latency_label(name), []).append((speedup, m["ppl"]))
    return points


UNITS = "LLM Surgeon, heads and MLP units"
PAPER = "1.25% a shot, 3 low-rank steps"                         # the paper's schedule
LINES = "a unit costs the sum of its lines"                        # --unit-cost lines
LATENCY_LABELS = {"surgeon": "LLM Surgeon, rows and columns, 1.25% a shot, 10 low-rank steps",
                  "rowcol": "LLM Surgeon, rows and columns, 5% a shot",   # latency.py's names
                  "units": f"{UNITS}, 5% a shot",                   # (-10, -20, -30: sparsity)
                  "units-pad8": f"{UNITS}, 5% a shot, padded to 8",
                  "units-lines": f"{UNITS}, 5% a shot, {LINES}",
                  "units-24-shots": f"{UNITS}, {PAPER}",
                  "units-24-shots-pad8": f"{UNITS}, {PAPER}, padded to 8",
                  "units-paper": f"{UNITS}, {PAPER}",
                  "kobd-units": "K-OBD, heads and MLP units, 10% a shot", "slicegpt": "SliceGPT"}
STYLE = {f"{UNITS}, 5% a shot, padded": ("C6", "D"),               # one look a model
         f"{UNITS}, 5% a shot, {LINES}": ("C9", "X"),
         f"{UNITS}, {PAPER}, padded": ("C4", "D"),
         f"{UNITS}, 5% a shot": ("C6", "v"), "LLM Surgeon, heads": ("C3", "v"),
         "K-OBD, heads and MLP units, 1.25%": ("C5", "o"), "K-OBD, heads": ("C0", "o"),
         "LLM Surgeon, rows and columns, 5%": ("C8", "^"), "LLM Surgeon, rows": ("C2", "^"),
         "SliceGPT": ("C1", "s")}


def latency_label(name):
    """'units-paper-20' (the 20% model of the paper's schedule) -> its label; a name without a
    sparsity is a 30% model."""
    base = name.rsplit("-", 1)[0] if name.rsplit("-", 1)[-1] in ("10", "20", "30") else name
    return LATENCY_LABELS.get(base, name)


def style(label):
    return next(v for k, v in STYLE.items() if label.startswith(k))


def units_figure(records, latency, out):
    curves, speeds = units_points(records), speed_points(latency)
    rows = (len(set(curves) | set(speeds)) + 1) // 2                 # the legend's
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2 + 0.2 * rows))
    for label, points in curves.items():
        x, y = zip(*points)
        color, marker = style(label)
        axes[0].plot([v / 1e6 for v in x], y, marker=marker, label=label, color=color,
                     markersize=5)
    for label, points in speeds.items():
        x, y = zip(*points)
        color, marker = style(label)
        axes[1].plot(x, y, marker, label=label, markersize=7, color=color)
    for ax, xlabel in zip(axes, ("parameters after compaction (M)",
                                 "forward pass, speed-up over dense (timed in turns)")):
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test perplexity")
        ax.set_title(title(records), fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    legend = {}                             # one legend under both panels, a model a line
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    fig.legend(legend.values(), legend.keys(), loc="lower center", ncol=2, fontsize=8)
    fig.tight_layout(rect=(0, (0.2 * rows + 0.1) / fig.get_figheight(), 1, 1))
    fig.savefig(out + ".png", dpi=120)
    with open(out + ".json", "w") as f:
        json.dump({"parameters": {k: [{"params": p, "ppl": v} for p, v in c]
                                  for k, c in curves.items()},
                   "speed": {k: [{"speedup": p, "ppl": v} for p, v in c]
                             for k, c in speeds.items()}}, f, indent=1)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--results", default=os.path.join(HERE, "records", "smollm2-brown"))
    p.add_argument("--latency", default=os.path.join(HERE, "records", "latency"),
                   help="benchmarks/latency.py's records")
    args = p.parse_args()
    records = load_records(args.results)
    base = args.results.rstrip("/")
    rowcol_figure(records, base + "-rowcol")
    quality_time_figure(records, base + "-quality-time")
    units_figure(records, args.latency, base + "-units")
    print(f"wrote {base}-rowcol.png, {base}-quality-time.png, {base}-units.png and their .json")


if __name__ == "__main__":
    main()

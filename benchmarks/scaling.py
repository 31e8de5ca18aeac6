"""How time and memory grow with width: Llama-shaped models built from configs (random weights,
2 blocks, vocabulary 1000), one LLM Surgeon shot each, every width in a fresh process so that its
peak memory is its own. Prints per stage the seconds and the peak resident memory, next to what
the memory model of the README predicts, and writes a JSON record.

    python benchmarks/scaling.py --widths 256 512 1024 2048 --json benchmarks/records/scaling.json

Defaults: 10% unstructured in one shot with max_correlate 1 (the element update's Cholesky work
grows with the cube of the removed count per row; 10% keeps the widest model near a few
minutes on 2 CPU cores), 4 calibration windows of 128 tokens.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))


def rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def workspace_bytes(m, k):
    """float64 bytes of one layer's workspace at its peak: W~ and the damped A, G and their
    inverses (2 k^2 + 2 m^2), the Cholesky factor and copy of the larger factor while it is
    inverted (max(k, m)^2 more), and about 3 more (m, k) arrays while costs are computed and
    the update is applied."""
    return 8 * (4 * m * k + 2 * k * k + 2 * m * m + max(k, m) ** 2)


def cost_bytes_per_weight(structure):
    """The candidates' bytes a weight: a float32 cost and a uint8 gain per weight (unstructured)
    or per group of M (N:M, which also keeps the chosen N of each group, a bool a weight); rows
    and columns keep the nonzero pattern, a bool a weight (their costs are few)."""
    if structure == "unstructured":
        return 5
    if structure == "rowcol":
        return 1
    M = int(structure.split(":")[1])
    return 5 / M + 1


def predict(layers, source, structure):
    """Bytes by the memory model: KFAC factors (float32, one A per input), costs
    (cost_bytes_per_weight), and the float64 workspace of the largest layer (workspace_bytes).
    The caller adds the model."""
    import scale
    n_weights = sum(l.weight.numel() for l in layers.values())
    per_candidate = cost_bytes_per_weight(structure)
    workspace = max(workspace_bytes(l.out_features, l.in_features + (l.bias is not None))
                    for l in layers.values())
    return {"factors": scale.factor_bytes(layers, source), "costs": int(per_candidate * n_weights),
            "workspace": workspace}


# Published shapes: (hidden, ffn, blocks, kv width, vocabulary, biases)
SHAPES = {"OPT-125m": (768, 3072, 12, 768, 50272, True),
          "OPT-1.3B": (2048, 8192, 24, 2048, 50272, True),
          "OPT-2.7B": (2560, 10240, 32, 2560, 50272, True),
          "OPT-6.7B": (4096, 16384, 32, 4096, 50272, True),
          "OPT-13B": (5120, 20480, 40, 5120, 50272, True),
          "Llama-2-7B": (4096, 11008, 32, 4096, 32000, False),
          "Llama-2-13B": (5120, 13824, 40, 5120, 32000, False),
          "Llama-2-70B": (8192, 28672, 80, 1024, 32000, False)}
DEVICES = (24, 48, 80, 141)                    # GB of common GPUs (24: a 4090, 141: an H200)


def block_layers(d, f, kv, bias):
    """(out, in, reads the input of) of every prunable layer of one block, in model order."""
    if bias:                                   # OPT: q, k, v, out_proj, fc1, fc2
        return [(d, d, "qkv"), (kv, d, "qkv"), (kv, d, "qkv"), (d, d, "o"), (f, d, "fc1"),
                (d, f, "fc2")]
    return [(d, d, "qkv"), (kv, d, "qkv"), (kv, d, "qkv"), (d, d, "o"), (f, d, "gate"),
            (f, d, "gate"), (d, f, "down")]


def activation_bytes(seqlen, vocab, d, f, blocks, dtype_bytes):
    """The curvature pass's backward on one window: the logits in the model's dtype, their
    float32 copy and gradient, and about 12 widths and 4 MLP widths a token a block saved."""
    return seqlen * vocab * (dtype_bytes + 8) + blocks * seqlen * (12 * d + 4 * f) * dtype_bytes


def terms_bytes(seqlen, widths, ranks):
    """Several ranks: one window's terms of every layer's sums (float32 labelled inputs, one per
    input tensor, and output gradients), which a rank holds while they are recorded and sent.
    widths: (distinct input widths, output widths) of all layers."""
    return 0 if ranks == 1 else 4 * (seqlen - 1) * (sum(widths[0]) + sum(widths[1]))


def flight_bytes(terms, ranks):
    """Where the rounds overlap (scale.Ranks.overlaps), the round before's terms in flight: this
    rank's window's until sent, and the others' that its layers read until added."""
    return round(terms * (2 - 1 / ranks))


def peak_bytes(parts):
    """The activations (and with ranks a window's terms, and the round in flight) live during the
    curvature pass, the costs and workspace after it."""
    return parts["model"] + parts["factors"] + max(parts["activations"] + parts.get("terms", 0)
                                                    + parts.get("flight", 0),
                                                    parts["costs"] + parts["workspace"]
                                                    + parts.get("kept", 0))


def per_rank_bytes(name, ranks, dtype_bytes, structure, seqlen=2048):
    """The memory model for the busiest rank: model (replicated), its factors, its costs, the
    float64 workspace of its largest layer, and (instead of costs and workspace, while the
    curvature pass runs) the activations of one window's backward."""
    d, f, blocks, kv, vocab, bias = SHAPES[name]
    b = int(bias)
    layers = [(m, n, f"{i}.{src}") for i in range(blocks) for m, n, src in block_layers(d, f, kv,
                                                                                         bias)]
    import scale
    owner = scale.Ranks.split([(m, n) for m, n, _ in layers], ranks)
    weights = sum(m * n for m, n, _ in layers)
    params = weights + (vocab * d if bias else 2 * vocab * d) + (2048 * d if bias else 0)
    worst = {}
    for r in range(ranks):
        mine = [layer for layer, o in zip(layers, owner) if o == r]
        inputs = {src: n + b for m, n, src in mine}            # one A per input a rank records
        factors = 4 * (sum(k * k for k in inputs.values()) + sum(m * m for m, _, _ in mine))
        costs = cost_bytes_per_weight(structure) * sum(m * n for m, n, _ in mine)
        workspace = max((workspace_bytes(m, n + b) for m, n, _ in mine), default=0)
        if factors + costs + workspace > worst.get("factors", 0) + worst.get("costs", 0) + \
                worst.get("workspace", 0):
            worst = {"factors": factors, "costs": costs, "workspace": workspace}
    activations = activation_bytes(seqlen, vocab, d, f, blocks, dtype_bytes)
    widths = ({src: n + b for m, n, src in layers}.values(), [m for m, _, _ in layers])
    parts = {"model": dtype_bytes * params, **worst, "activations": activations,
             "terms": terms_bytes(seqlen, widths, ranks)}
    parts["peak"] = peak_bytes(parts)
    return parts


def predict_folder(folder, dtype_bytes, structure, seqlen, ranks=1, keep_in=None,
                   overlap=False):
    """The memory model for a run of run_opt.py on the model in `folder` (its config alone, no
    weights): bytes of each part on the busiest rank, "runtime" (python, torch and transformers,
    measured here) included, and "peak". keep_in: LLM Surgeon on a device of that many bytes,
    which keeps the layers' quadratic models (float64 W~, A_inv, G_inv, the removed weights' bool
    mask; rows and columns also the float64 A, G of their forms) from the costs to the update
    while a quarter of it stays free (scale.keeps), counted in "kept"; with overlap (ranks) the
    round in flight where it leaves a quarter free (scale.Ranks.overlaps), counted in "flight"."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    import scale
    import surgeon
    config = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    layers = surgeon.prunable_layers(model)
    shapes = [(l.out_features, l.in_features, l.bias is not None) for l in layers.values()]
    owner = scale.Ranks.split([(m, n) for m, n, _ in shapes], ranks)
    names, worst = list(layers), None
    for r in range(ranks):
        mine = {n: layers[n] for n, o in zip(names, owner) if o == r}
        source = {}                             # q/k/v read one input, gate/up (fc1 alone) one
        for n in mine:
            block, kind = n.rsplit(".", 2)[0], n.rsplit(".", 1)[-1]
            first = {"k_proj": "q_proj", "v_proj": "q_proj", "up_proj": "gate_proj"}.get(kind)
            source[n] = f"{block}.{first}" if first and f"{block}.{first}" in mine else n
        parts = predict(mine, source, structure) if mine else \
            {"factors": 0, "costs": 0, "workspace": 0}
        if worst is None or sum(parts.values()) > sum(worst.values()):
            worst, mine_of_busiest = parts, mine
    d, V = config.hidden_size, config.vocab_size
    f = getattr(config, "intermediate_size", None) or config.ffn_dim
    activations = activation_bytes(seqlen, V, d, f, config.num_hidden_layers, dtype_bytes)
    shared = {"k_proj": "q_proj", "v_proj": "q_proj", "up_proj": "gate_proj"}   # read q's, gate's
    inputs = {n.rsplit(".", 1)[0] + "." + shared.get(n.rsplit(".", 1)[1], n.rsplit(".", 1)[1]):
              l.in_features + (l.bias is not None) for n, l in layers.items()}
    widths = (inputs.values(), [l.out_features for l in layers.values()])
    parts = {"runtime": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
             "model": sum(p.numel() for p in model.parameters()) * dtype_bytes, **worst,
             "activations": activations, "terms": terms_bytes(seqlen, widths, ranks), "kept": 0}
    if keep_in and overlap and ranks > 1:              # scale.Ranks.overlaps, after a window
        free = keep_in - parts["runtime"] - parts["model"] - parts["factors"] - parts["terms"]
        if free - 2 * parts["terms"] >= scale.KEEP_FREE * keep_in:
            parts["flight"] = flight_bytes(parts["terms"], ranks)
    if keep_in:
        room = (1 - scale.KEEP_FREE) * keep_in - parts["runtime"] - peak_bytes(parts)
        for l in mine_of_busiest.values():
            m, k = l.out_features, l.in_features + (l.bias is not None)
            need = 9 * m * k + 8 * (k * k + m * m) * (2 if structure == "rowcol" else 1)
            if room - 3 * need < 0:
                break
            parts["kept"], room = parts["kept"] + need, room - need
    parts["peak"] = parts["runtime"] + peak_bytes(parts)
    return parts


def model_table():
    """The memory model applied to published shapes, in GB (2**30 bytes): the busiest rank's
    peak at 1, 2, 4 and 8 ranks, with the smallest common device that holds it."""
    GB = 2**30
    for structure, title in (("unstructured", "element structures (unstructured; N:M needs "
                              "less)"), ("rowcol", "rows and columns")):
        print(f"\n{title}: the busiest rank's peak, GiB (smallest of {', '.join(map(str, DEVICES))}"
              " GB that holds it; - none)\n")
        print("| model | weights | model | factors, all | 1 rank | 2 ranks | 4 ranks | 8 ranks |")
        print("|---|---|---|---|---|---|---|---|")
        for name in SHAPES:
            for dtype, size in (("float32", 4), ("16-bit", 2)):
                cells = []
                for ranks in (1, 2, 4, 8):
                    parts = per_rank_bytes(name, ranks, size, structure)
                    fits = next((f"{g}" for g in DEVICES if parts["peak"] <= g * 1e9), "-")
                    cells.append(f"{parts['peak'] / GB:.1f} ({fits})")
                    if ranks == 1:
                        model, factors = parts["model"] / GB, parts["factors"] / GB
                print(f"| {name} | {dtype} | {model:.1f} | {factors:.1f} | " + " | ".join(cells)
                      + " |")


KEEP = "2b4e0cf"          # the commit from which LLM Surgeon keeps quadratic models (scale.keeps)
OVERLAP = "0862c22"       # from which ranks exchange a round's terms during the next one


def descends(commit, feature):
    """Whether a record's commit has the commit `feature` (KEEP, OVERLAP) among its ancestors."""
    return bool(commit) and subprocess.run(["git", "merge-base", "--is-ancestor", feature,
                                            commit], cwd=HERE, capture_output=True).returncode == 0


def total_memory():
    """This machine's memory, bytes (Linux), where the records were made."""
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemTotal:"))


def against(paths):
    """The memory model's peak beside the measured peak of each record, in MiB."""
    print("| record | measured peak MiB | predicted | of it: model, factors, costs + workspace, "
          "activations | error |")
    print("|---|---|---|---|---|")
    for path in paths:
        with open(path) as f:
            r = json.load(f)
        cfg = r["settings"]
        size = {"float32": 4, "bfloat16": 2, "float16": 2}[r.get("model_dtype", "float32")]
        ranks = r["provenance"].get("world_size", 1)
        commit = r["provenance"].get("commit")
        keep_in = total_memory() if cfg["method"] == "surgeon" and descends(commit, KEEP) \
            else None
        parts = predict_folder(cfg["model"], size, cfg["structure"], cfg["seqlen"], ranks,
                               keep_in, descends(commit, OVERLAP))
        peaks = [max(p.values()) for p in r.get("peak_memory_mb_ranks", [r["peak_memory_mb"]])]
        measured, mib = max(peaks), {k: v / 2**20 for k, v in parts.items()}
        print(f"| {os.path.relpath(path)} | {measured:.0f} | {mib['peak']:.0f} | {mib['model']:.0f}, "
              f"{mib['factors']:.0f}, {mib['costs'] + mib['workspace'] + mib['kept']:.0f}, "
              f"{mib['activations'] + mib['terms'] + mib.get('flight', 0):.0f} | "
              f"{mib['peak'] / measured - 1:+.0%} |")


def one(width, args):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    import scale
    import surgeon
    base = rss_mb()
    torch.manual_seed(0)
    inter = round(8 / 3 * width / 64) * 64
    config = LlamaConfig(vocab_size=1000, hidden_size=width, intermediate_size=inter,
                         num_hidden_layers=args.blocks, num_attention_heads=width // 64,
                         num_key_value_heads=width // 64, max_position_embeddings=512)
    model = LlamaForCausalLM(config).eval()
    model_bytes = sum(p.numel() * 4 for p in model.parameters())
    after_model = rss_mb()
    layers = surgeon.prunable_layers(model)
    batches = [torch.randint(0, 1000, (1, args.seqlen), generator=torch.Generator().manual_seed(i))
               for i in range(args.nsamples)]
    s = surgeon.Settings(sparsity=args.sparsity, structure=args.structure, shots=1,
                         max_correlate=args.max_correlate)
    tic = time.perf_counter()
    report = scale.prune(model, batches, s)
    seconds = report["shots"][0]["seconds"]
    rec = surgeon.Recorder("cpu")                              # which layers share an input
    hooks = {layer: rec.forward_hook(name) for name, layer in layers.items()}
    with surgeon.frozen_with_hooks(model, hooks), torch.no_grad():
        rec.start_batch(batches[0][:, :2])
        model(batches[0][:, :2])
    parts = predict(layers, rec.source, args.structure)
    parts["model"] = model_bytes
    peak = rss_mb()
    return {"width": width, "intermediate": inter, "params": sum(p.numel() for p in model.parameters()),
            "seconds": {k: round(v, 2) for k, v in seconds.items()},
            "seconds_total": round(time.perf_counter() - tic, 2),
            "rss_mb": {"after_imports": round(base, 1), "after_model": round(after_model, 1),
                       "peak": round(peak, 1)},
            "predicted_mb": {k: round(v / 2**20, 1) for k, v in parts.items()},
            "predicted_peak_mb": round(base + sum(parts.values()) / 2**20, 1)}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--widths", type=int, nargs="+", default=[256, 512, 1024, 2048])
    p.add_argument("--blocks", type=int, default=2)
    p.add_argument("--sparsity", type=float, default=0.1)
    p.add_argument("--structure", default="unstructured")
    p.add_argument("--max-correlate", type=int, default=1)
    p.add_argument("--nsamples", type=int, default=4)
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument("--json", help="write all rows here")
    p.add_argument("--one", type=int, help=argparse.SUPPRESS)     # a single width, in-process
    p.add_argument("--model-table", action="store_true",
                   help="only print the memory model per rank for published OPT and Llama-2 "
                        "shapes")
    p.add_argument("--against", nargs="+", metavar="RECORD",
                   help="only print the memory model's peak for these run_opt.py records (their "
                        "model, dtype, structure, window length and ranks) beside their peaks")
    args = p.parse_args()
    if args.model_table:
        return model_table()
    if args.against:
        return against(args.against)
    if args.one:
        print(json.dumps(one(args.one, args)))
        return
    import run_opt
    rows, provenance = [], run_opt.provenance()
    for width in args.widths:
        cmd = [sys.executable, __file__, "--one", str(width), "--blocks", str(args.blocks),
               "--sparsity", str(args.sparsity), "--structure", args.structure,
               "--max-correlate", str(args.max_correlate), "--nsamples", str(args.nsamples),
               "--seqlen", str(args.seqlen)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        row = json.loads(out.strip().splitlines()[-1])
        rows.append(row)
        if args.json:                                      # after every width: a kill keeps them
            with open(args.json, "w") as f:
                json.dump({"command": " ".join(sys.argv), "provenance": provenance, "rows": rows},
                          f, indent=1)
        pred, peak = row["predicted_peak_mb"], row["rss_mb"]["peak"]
        print(f"width {width:5d} ({row['params'] / 1e6:6.1f}M params): "
              + "  ".join(f"{k} {v:.1f}s" for k, v in row["seconds"].items())
              + f"  peak {peak:.0f} MB, predicted {pred:.0f} MB ({pred / peak - 1:+.0%}); "
              + ", ".join(f"{k} {v:.0f}" for k, v in row["predicted_mb"].items()), flush=True)


if __name__ == "__main__":
    main()

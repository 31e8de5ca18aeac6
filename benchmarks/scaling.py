"""How time and memory grow with width: Llama-shaped models built from configs (random weights,
2 blocks, vocabulary 1000), one LLM Surgeon shot each, every width in a fresh process so that its
peak memory is its own. Prints per stage the seconds and the peak resident memory, next to what
the memory model of the README predicts, and writes a JSON record.

    python benchmarks/scaling.py --widths 256 512 1024 2048 --json benchmarks/scaling.json

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


def predict(layers, source, structure):
    """Bytes by the memory model: model (float32), KFAC factors (float32, one A per input),
    costs (float32 + a uint8 gain per weight or group; rows and columns: the nonzero pattern, one
    byte per weight), and the float64 workspace of the largest layer (workspace_bytes)."""
    import surgeon
    n_weights = sum(l.weight.numel() for l in layers.values())
    per_candidate = 5 if structure != "rowcol" else 1      # rowcol: the nonzero pattern
    workspace = max(workspace_bytes(l.out_features, l.in_features + (l.bias is not None))
                    for l in layers.values())
    return {"factors": surgeon.factor_bytes(layers, source), "costs": per_candidate * n_weights,
            "workspace": workspace}


# Published shapes: (hidden, ffn, blocks, kv width, vocabulary, biases)
SHAPES = {"OPT-125m": (768, 3072, 12, 768, 50272, True),
          "Llama-2-7B": (4096, 11008, 32, 4096, 32000, False),
          "Llama-2-13B": (5120, 13824, 40, 5120, 32000, False)}


def model_table():
    """The memory model applied to published shapes, in GB (2**30 bytes)."""
    GB = 2**30
    rows = []
    for name, (d, f, blocks, kv, vocab, bias) in SHAPES.items():
        b = int(bias)
        # (out, in) of every prunable layer of a block, and the distinct inputs' widths
        shapes = [(d, d), (kv, d), (kv, d), (d, d)] + \
            ([(f, d), (d, f)] if bias else [(f, d), (f, d), (d, f)])
        a_widths = [d + b, d + b, d + b, f + b]                 # qkv, out/o, fc1/gate+up, fc2/down
        factors = 4 * blocks * (sum(k * k for k in a_widths) + sum(m * m for m, _ in shapes))
        weights = blocks * sum(m * n for m, n in shapes)
        params = weights + (vocab * d if bias else 2 * vocab * d) + (2048 * d if bias else 0)
        workspace = max(workspace_bytes(m, n + b) for m, n in shapes)
        model, costs, pattern = 4 * params, 5 * weights, weights
        rows.append((name, model / GB, factors / GB, costs / GB, workspace / GB,
                     (model + factors + costs + workspace) / GB,
                     (model + costs + workspace) / GB, (model + factors + pattern + workspace) / GB,
                     (model + pattern + workspace) / GB))
    print("| model | model | factors | costs (element) | workspace | all on the device "
          "| device, factors in host memory | rows+cols, all on the device "
          "| rows+cols, factors in host memory |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | " + " | ".join(f"{x:.1f}" for x in r[1:]) + " |")


def one(width, args):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
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
    report = surgeon.prune(model, batches, s)
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
                   help="only print the memory model for OPT-125m, Llama-2-7B and 13B")
    args = p.parse_args()
    if args.model_table:
        return model_table()
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

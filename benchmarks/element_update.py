"""The element update (Eq. 7-8, a row a chunk, as the grid runs it) against its flop count.

    python benchmarks/element_update.py --before f55714a --json benchmarks/records/pace/element-update.json

1. This machine's float64 rates, one thread: Cholesky (LAPACK potrf, n^3/3 flops) at sizes from
   32 to 1536, and a matrix product (2 n^3) at 576.
2. SmolLM2-135M-Instruct's layers in blocks 0, 15 and 29 (what benchmarks/setup.sh builds), their
   KFAC factors from 8 windows of 512 tokens of Brown train, and a mask of 50% of each block's
   weights by the global threshold on their element costs (Eq. 5) among those layers.
3. Each layer's update: its Cholesky flops a row at a time on the removed weights Q (|Q|^3/3,
   the code of --before) and on the smaller of Q and the kept live weights F (min(|Q|, |F|)^3/3,
   this checkout); the seconds these take at the rates of 1; and the measured seconds of
   scale.remove_elements_lazily of --before (taken from git) and of this checkout, and the
   largest difference between the weights they write.
"""
import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
ASSETS = os.path.join(HERE, "assets")
SIZES = (32, 64, 128, 192, 256, 384, 512, 768, 1024, 1536)


def seconds_of(f, least=0.5):
    """Median seconds of f() over runs that take at least `least` seconds in all."""
    times = []
    while sum(times) < least or len(times) < 3:
        tic = time.perf_counter()
        f()
        times.append(time.perf_counter() - tic)
    return sorted(times)[len(times) // 2]


def rates():
    out = {}
    for n in SIZES:
        X = torch.randn(n, 2 * n, dtype=torch.float64)
        S = X @ X.T / n + torch.eye(n, dtype=torch.float64)
        out[n] = n ** 3 / 3 / seconds_of(lambda: torch.linalg.cholesky_ex(S, upper=True))
    X = torch.randn(576, 576, dtype=torch.float64)
    gemm = 2 * 576 ** 3 / seconds_of(lambda: X @ X)
    return out, gemm


def rate_at(potrf, n):
    """potrf's flop rate at size n, interpolated between the measured sizes."""
    sizes = sorted(potrf)
    if n <= sizes[0]:
        return potrf[sizes[0]]
    for a, b in zip(sizes, sizes[1:]):
        if n <= b:
            return potrf[a] + (potrf[b] - potrf[a]) * (n - a) / (b - a)
    return potrf[sizes[-1]]


def scale_of(commit):
    """scale.py of an earlier commit, as a module (surgeon.py of this checkout beside it)."""
    source = subprocess.run(["git", "show", f"{commit}:scale.py"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout
    path = os.path.join(tempfile.mkdtemp(), "scale_before.py")
    with open(path, "w") as f:
        f.write(source)
    spec = importlib.util.spec_from_file_location("scale_before", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def layers_and_masks(blocks, windows):
    import run_opt
    import surgeon
    model, tokenizer = run_opt.load(os.path.join(ASSETS, "smollm2-135m-instruct"))
    ids = run_opt.token_ids(tokenizer, os.path.join(ASSETS, "brown", "train.txt"), "train")
    batches = run_opt.calibration_windows(ids, windows, 512, 0, "Brown train")
    layers = {n: l for n, l in surgeon.prunable_layers(model).items()
              if int(n.split(".")[2]) in blocks}
    factors = surgeon.kfac_factors(model, layers, batches)
    cfg = surgeon.Settings(sparsity=0.5, structure="unstructured", max_correlate=1)
    quads = {n: surgeon.quadratic(l, *factors[n], cfg, n) for n, l in layers.items()}
    out = []
    for block in blocks:
        names = [n for n in quads if int(n.split(".")[2]) == block]
        costs = {n: surgeon.element_costs(quads[n].W[:, :quads[n].n_in], quads[n].alpha,
                                          quads[n].gamma) for n in names}
        every = torch.cat([c.flatten() for c in costs.values()])
        thr = every.kthvalue(len(every) // 2).values
        out += [(n, quads[n], costs[n] <= thr) for n in names]
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--before", required=True, help="the commit whose update is compared")
    p.add_argument("--blocks", type=int, nargs="+", default=[0, 15, 29])
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--json", help="write the record here")
    args = p.parse_args()
    torch.set_num_threads(1)
    import run_opt
    import scale
    start = run_opt.provenance()
    before = scale_of(args.before)
    potrf, gemm = rates()
    print("float64, one thread: potrf " + ", ".join(f"{n}: {r / 1e9:.1f}" for n, r in potrf.items())
          + f" GFlop/s; matrix product {gemm / 1e9:.1f} GFlop/s", flush=True)
    rows, totals = [], {"flops_before": 0, "flops_now": 0, "model_seconds_before": 0.0,
                        "model_seconds_now": 0.0, "seconds_before": 0.0, "seconds_now": 0.0}
    for name, quad, taken in layers_and_masks(args.blocks, args.windows):
        W = quad.W
        mask = torch.nn.functional.pad(taken | quad.removed, (0, W.shape[1] - quad.n_in))
        live = quad.A_inv.diagonal() > 0
        counts = (mask & live[None] & (quad.G_inv.diagonal() > 0)[:, None]).sum(1).tolist()
        n_live = int(live.sum())
        q = [c for c in counts if c]
        small = [min(c, n_live - c) for c in q]
        row = {"layer": name, "shape": list(W.shape), "rows_solved": len(q),
               "mean_removed": sum(q) / max(1, len(q)),
               "flops_before": sum(c ** 3 / 3 for c in q),
               "flops_now": sum(c ** 3 / 3 for c in small),
               "model_seconds_before": sum(c ** 3 / 3 / rate_at(potrf, c) for c in q),
               "model_seconds_now": sum(c ** 3 / 3 / rate_at(potrf, c) for c in small if c)}
        tic = time.perf_counter()
        old = before.remove_elements_lazily(W, quad.A_inv, quad.G_inv, mask, 1)
        row["seconds_before"] = time.perf_counter() - tic
        tic = time.perf_counter()
        new = scale.remove_elements_lazily(W, quad.A_inv, quad.G_inv, mask, 1)
        row["seconds_now"] = time.perf_counter() - tic
        row["max_abs_difference"] = float((old - new).abs().max())
        row["max_abs_weight"] = float(W.abs().max())
        for k in totals:
            totals[k] += row[k]
        rows.append(row)
        print(f"{name:40} {row['mean_removed']:6.1f} removed a row  Cholesky GFlop "
              f"{row['flops_before'] / 1e9:6.2f} -> {row['flops_now'] / 1e9:6.2f}  model s "
              f"{row['model_seconds_before']:5.2f} -> {row['model_seconds_now']:5.2f}  "
              f"measured s {row['seconds_before']:5.2f} -> {row['seconds_now']:5.2f}  "
              f"max diff {row['max_abs_difference']:.1e}", flush=True)
    print("all: Cholesky GFlop {:.1f} -> {:.1f}; at potrf's rate {:.1f} s -> {:.1f} s; measured "
          "{:.1f} s -> {:.1f} s".format(totals["flops_before"] / 1e9, totals["flops_now"] / 1e9,
                                        totals["model_seconds_before"],
                                        totals["model_seconds_now"], totals["seconds_before"],
                                        totals["seconds_now"]))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"provenance": {**start, "end_load_average": os.getloadavg(), "threads": 1,
                                      "before": args.before,
                                      "command": "python benchmarks/element_update.py "
                                                 + " ".join(sys.argv[1:])},
                       "potrf_flops_per_s": potrf, "matmul_flops_per_s_576": gemm,
                       "totals": totals, "layers": rows}, f, indent=1)


if __name__ == "__main__":
    main()

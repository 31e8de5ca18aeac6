"""What one shot's update buys, at 50% unstructured in one shot, on the grid's protocol
(SmolLM2-135M-Instruct as benchmarks/setup.sh builds it; 32 calibration windows of 512 tokens
of Brown train, seed 0; the first 64 windows of 512 tokens of Brown test). One curvature pass
on the dense model, then four ways to prune from the same factors:
  surgeon            LLM Surgeon's costs and its update (a row at a time), as the grid runs it
  surgeon-no-update  LLM Surgeon's costs, the weights zeroed without an update
  kobd               K-OBD's costs, no update (the grid's K-OBD)
  kobd-then-update   the weights K-OBD chose, removed with LLM Surgeon's update

    python benchmarks/one_shot.py --json benchmarks/records/studies/one-shot/unstructured-50.json
"""
import argparse
import dataclasses
import json
import os
import sys
import time
from types import SimpleNamespace

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
ASSETS = os.path.join(HERE, "assets")


PROTOCOL = "grid: SmolLM2-135M-Instruct, 32 x 512 Brown train, seed 0, 64 x 512 Brown test"


def grid_data():
    """The model, its test windows and its calibration windows, as the grid has them."""
    import run_opt
    model, tokenizer = run_opt.load(os.path.join(ASSETS, "smollm2-135m-instruct"))
    protocol = SimpleNamespace(seqlen=512, eval_windows=64, nsamples=32, seed=0,
                               test_file=os.path.join(ASSETS, "brown", "test.txt"),
                               train_file=os.path.join(ASSETS, "brown", "train.txt"))
    return (model, *run_opt.load_data(protocol, tokenizer, 8192))


def write_record(path, start, script, fields):
    """A study's record: its provenance (from run_opt.provenance() at the start) and fields."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"provenance": {**start, "end_load_average": os.getloadavg(),
                                  "threads": torch.get_num_threads(),
                                  "command": f"python benchmarks/{script} "
                                             + " ".join(sys.argv[1:])}, **fields}, f, indent=1)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--json", help="write the record here")
    args = p.parse_args()
    import run_opt
    import scale
    import surgeon

    class Cached(scale.Fast):                      # the dense model's factors, every variant
        def __init__(self, factors):
            self.cached = factors

        def factors(self, model, layers, batches, device=None):
            return self.cached

    class NoUpdate(surgeon.Unstructured):          # the chosen weights zeroed, nothing else
        def update(self, quad, taken, cand, cfg, rt):
            return super().update(quad, taken, cand, dataclasses.replace(cfg, method="kobd"), rt)

    class Chosen(surgeon.Unstructured):            # these weights, whatever their costs
        def __init__(self, masks):
            self.masks = masks

        def select(self, cands, target, zeros, rt):
            return [m.flatten() for m in self.masks]

    start = run_opt.provenance()
    model, test, calib = grid_data()
    layers = surgeon.prunable_layers(model)
    dense = {n: (l.weight.detach().clone(), None if l.bias is None else l.bias.detach().clone())
             for n, l in layers.items()}
    tic = time.perf_counter()
    factors = scale.Fast().factors(model, layers, calib)
    curvature = time.perf_counter() - tic
    print(f"curvature: {curvature:.0f} s", flush=True)

    def run(name, method, structure):
        with torch.no_grad():
            for n, layer in layers.items():
                layer.weight.copy_(dense[n][0])
        settings = surgeon.Settings(sparsity=args.sparsity, structure="unstructured", shots=1,
                                    method=method, max_correlate=1)
        tic = time.perf_counter()
        report = surgeon.prune(model, calib, settings, structure=structure,
                               runtime=Cached(factors))
        seconds = time.perf_counter() - tic
        ppl = run_opt.perplexity(model, test, "cpu", name)
        print(f"{name:18} sparsity {report['sparsity']:.4f}  ppl {ppl:.2f}  ({seconds:.0f} s)",
              flush=True)
        return {"name": name, "ppl": ppl, "sparsity": report["sparsity"], "seconds": seconds}

    rows = [run("surgeon", "surgeon", surgeon.Unstructured()),
            run("surgeon-no-update", "surgeon", NoUpdate()),
            run("kobd", "kobd", surgeon.Unstructured())]
    kobd_masks = [layer.weight == 0 for layer in layers.values()]
    rows.append(run("kobd-then-update", "surgeon", Chosen(kobd_masks)))
    if args.json:
        write_record(args.json, start, "one_shot.py",
                     {"protocol": PROTOCOL + "; one curvature pass on the dense model",
                      "curvature_seconds": curvature, "variants": rows})


if __name__ == "__main__":
    main()

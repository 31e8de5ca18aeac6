"""K-OBD's choice with LLM Surgeon's update, over several shots, on the grid's protocol
(SmolLM2-135M-Instruct as benchmarks/setup.sh builds it; 32 calibration windows of 512 tokens of
Brown train, seed 0; the first 64 windows of 512 tokens of Brown test): each shot's curvature
pass as LLM Surgeon's, its weights chosen by K-OBD's cost 1/2 w^2 A_jj G_ii (the undamped
factors), and removed with LLM Surgeon's correlated update (Eq. 7-8, a row at a time). The
grid's records hold LLM Surgeon's own choice at 1, 2 and 5 shots.

    python benchmarks/choice.py --shots 2 --json benchmarks/records/studies/one-shot/kobd-choice-shots-2.json
"""
import argparse
import os
import sys
import time
from types import SimpleNamespace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.one_shot import PROTOCOL, grid_data, write_record  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--shots", type=int, default=1)
    p.add_argument("--json", help="write the record here")
    args = p.parse_args()
    import run_opt
    import scale
    import surgeon

    class KOBDChoice(surgeon.Unstructured):       # K-OBD's costs, LLM Surgeon's update
        diagonals = {}                            # layer -> (diag A, diag G) of this shot

        def candidates(self, quad, cfg):
            a, g = (x.to(quad.W) for x in self.diagonals[quad.name])
            alpha, gamma = a.masked_fill(quad.alpha == 0, 0), g.masked_fill(quad.gamma == 0, 0)
            return super().candidates(SimpleNamespace(W=quad.W, n_in=quad.n_in, alpha=alpha,
                                                      gamma=gamma, removed=quad.removed), cfg)

    class Remember(scale.Fast):                   # the factors' diagonals for the choice
        def factors(self, model, layers, batches, device=None):
            factors = super().factors(model, layers, batches, device)
            KOBDChoice.diagonals = {n: (A.diagonal().double(), G.diagonal().double())
                                    for n, (A, G) in factors.items()}
            return factors

    start = run_opt.provenance()
    model, test, calib = grid_data()
    settings = surgeon.Settings(sparsity=args.sparsity, structure="unstructured",
                                shots=args.shots, method="surgeon", max_correlate=1)
    shots = []
    tic = time.perf_counter()
    with scale.highest_precision():
        report = surgeon.prune(model, calib, settings, on_shot=shots.append,
                               structure=KOBDChoice(), runtime=Remember())
    seconds = time.perf_counter() - tic
    ppl = run_opt.perplexity(model, test, "cpu", "eval pruned")
    print(f"K-OBD's choice, LLM Surgeon's update, {args.shots} shots: sparsity "
          f"{report['sparsity']:.4f}  ppl {ppl:.4f}  ({seconds:.0f} s)", flush=True)
    if args.json:
        write_record(args.json, start, "choice.py",
                     {"protocol": PROTOCOL, "settings": {"sparsity": args.sparsity,
                                                         "shots": args.shots, "choice": "kobd",
                                                         "update": "surgeon", "max_correlate": 1},
                      "ppl_pruned": ppl, "sparsity": report["sparsity"], "seconds": seconds,
                      "shots": shots})


if __name__ == "__main__":
    main()

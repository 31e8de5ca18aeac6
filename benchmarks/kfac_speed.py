"""Time of one KFAC pass (surgeon.kfac_factors) over the calibration batches, divided by the time
of a plain forward + backward (loss.backward(), weight gradients included) over the same batches,
in the same process. Prints both and the ratio.

    python benchmarks/kfac_speed.py --model DIR --train-file TEXT --nsamples 8 --seqlen 512 \\
        --json benchmarks/records/kfac-speed.json
"""
import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import run_opt  # noqa: E402
import scale  # noqa: E402
import surgeon  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--train-file")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--repeats", type=int, default=2, help="alternating timings of each; best kept")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", help="write the timings and the run's provenance here")
    args = p.parse_args()
    model, tokenizer = run_opt.load(args.model, args.device)
    ids = run_opt.token_ids(tokenizer, args.train_file, "train")
    batches = [b.to(args.device) for b in
               run_opt.calibration_windows(ids, args.nsamples, args.seqlen, 0, "train")]
    layers = surgeon.prunable_layers(model)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)

    def plain():
        for b in batches:
            surgeon.next_token_loss(model, b).backward()
        model.zero_grad(set_to_none=True)

    def kfac():
        scale.Fast().factors(model, layers, batches)

    best = {"plain": float("inf"), "kfac": float("inf")}
    for _ in range(args.repeats):
        for name, fn in (("plain", plain), ("kfac", kfac)):
            sync()
            tic = time.perf_counter()
            fn()
            sync()
            best[name] = min(best[name], time.perf_counter() - tic)
    tokens = args.nsamples * args.seqlen
    print(f"{args.nsamples} x {args.seqlen} tokens on {args.device} "
          f"({torch.get_num_threads()} threads)")
    print(f"plain forward+backward: {best['plain']:.2f} s ({tokens / best['plain']:.0f} tokens/s)")
    print(f"KFAC pass:              {best['kfac']:.2f} s ({tokens / best['kfac']:.0f} tokens/s)")
    print(f"ratio KFAC / plain:     {best['kfac'] / best['plain']:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": " ".join(sys.argv), "provenance": run_opt.provenance(),
                       "settings": vars(args), "tokens": tokens, "seconds": best,
                       "ratio": best["kfac"] / best["plain"]}, f, indent=1)


if __name__ == "__main__":
    main()

"""Saved pruned models side by side: parameters, perplexity and the forward latency of the same
batch, timed in turns (model 1, model 2, ..., again) so that every model sees the same load.

    OMP_NUM_THREADS=2 python benchmarks/latency.py --test-file benchmarks/assets/brown/test.txt \\
        --eval-windows 64 --json benchmarks/records/latency/rowcol-30.json \\
        dense=benchmarks/assets/smollm2-135m-instruct \\
        surgeon=out/surgeon-rowcol-30-lora-10 slicegpt=out/slicegpt-rowcol-30

Each NAME=FOLDER is a Hugging Face folder, a folder that `run_opt.py --save` wrote (compacted or
not) or one that `peers/slicegpt.py --save` wrote (it has slicegpt.json). The batch is the first 8
test windows, as in `run_opt.py --compact`; the latency of a model is the median of `--rounds`
timed passes after one warm-up pass each, and its speed-up over the first model the median of
the rounds' own ratios, with their quartiles.
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))          # run as a script: the repository's modules

import command    # noqa: E402
import run_opt    # noqa: E402
from benchmarks.peers import slicegpt   # noqa: E402


def load(folder):
    if os.path.exists(os.path.join(folder, slicegpt.SPEC)):         # its config is in SPEC
        from transformers import AutoTokenizer
        return slicegpt.load(folder), AutoTokenizer.from_pretrained(folder)
    return run_opt.load(folder)


@torch.no_grad()
def timed(model, batch):
    tic = time.perf_counter()
    model(batch)
    return 1000 * (time.perf_counter() - tic)


def paired_speedups(reference, times):
    """Each round's speed-up over the reference model timed in the same round: a load that
    drifts across the run slows both passes of a round alike."""
    return [r / t for r, t in zip(reference, times)]


def quartiles(values):
    """[first, third] quartile (the values themselves when there are fewer than two)."""
    if len(values) < 2:
        return [values[0], values[0]]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return [q[0], q[2]]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("models", nargs="+", metavar="NAME=FOLDER")
    p.add_argument("--test-file")
    p.add_argument("--seqlen", type=command.positive, default=512)
    p.add_argument("--eval-windows", type=command.positive, default=64)
    p.add_argument("--rounds", type=command.positive, default=7)
    p.add_argument("--json")
    args = p.parse_args(argv)
    pairs = [m.split("=", 1) for m in args.models]
    if any(len(pair) != 2 or not os.path.isdir(pair[1]) for pair in pairs):
        p.error("each model is NAME=FOLDER, an existing folder")
    record = run_opt.new_record(args, "cpu")
    if any(name in record for name, _ in pairs) or len({n for n, _ in pairs}) < len(pairs):
        p.error(f"model names must differ from each other and from {', '.join(record)}")
    models, test = {}, None
    for name, folder in pairs:
        model, tokenizer = load(folder)
        if test is None:                    # the models share a tokenizer: the first one's
            test = run_opt.eval_windows(run_opt.token_ids(tokenizer, args.test_file, "test"),
                                        args.seqlen, args.eval_windows, args.test_file)
        models[name] = model.eval()
        record[name] = {"folder": folder, "params": sum(p.numel() for p in model.parameters()),
                        "ppl": run_opt.perplexity(model, test, "cpu", f"eval {name}")}
    batch = torch.cat(test[:8])
    for model in models.values():
        timed(model, batch)                                              # warm-up
    times = {name: [] for name in models}
    for _ in range(args.rounds):
        for name, model in models.items():
            times[name].append(timed(model, batch))
    first = next(iter(models))
    print(f"batch {tuple(batch.shape)}, median of {args.rounds} passes taken in turns; speed-up "
          f"over {first}: the median of the rounds' own ratios (quartiles in brackets)")
    for name in models:
        speedups = paired_speedups(times[first], times[name])
        record[name].update(latency_ms=statistics.median(times[name]), times_ms=times[name],
                            speedup=statistics.median(speedups), speedup_over=first,
                            speedup_quartiles=quartiles(speedups))
        r = record[name]
        low, high = r["speedup_quartiles"]
        print(f"{name:>10}: {r['params'] / 1e6:7.2f}M parameters, perplexity {r['ppl']:8.2f}, "
              f"{r['latency_ms']:7.0f} ms, {r['speedup']:.2f}x {first} ({low:.2f}-{high:.2f})")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()

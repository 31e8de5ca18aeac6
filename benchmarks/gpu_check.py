"""The GPU check: one command for a bare CUDA machine (torch and transformers, no hub, no
network), within about 8 minutes on one H100/H200-class GPU.

    python benchmarks/gpu_check.py --json benchmarks/records/gpu-check.json      # on the GPU machine
    python benchmarks/gpu_check.py --cpu                                 # tiny shapes, a minute

1. the test suite with `--device cuda`: every test that takes a device runs on the GPU, among
   them CPU against CUDA for every structure and method (the same masks, weights within 1e-5);
2. the paper's protocol timed on OPT-125m's and OPT-1.3B's published shapes with random weights
   in float16 (what `--dtype auto` loads for OPT): 128 windows of 2048 random token ids; rows and
   columns to 30% in 24 shots of 1.25% with 3 low-rank steps a shot, and 2:4 in 5 shots. Only
   the first shots run; the whole run's seconds are extrapolated from them (the record says how
   many ran). Peak GPU memory of each run against the memory model (benchmarks/scaling.py).

It writes one JSON record (after every part, so a run stopped at a time limit keeps what it
measured) and prints a table. --cpu runs the same code on tiny shapes (CI runs it, so that it
cannot rot); there the suite is not run again and no GPU memory is measured.
"""
import argparse
import json
import os
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)
import run_opt   # noqa: E402
import scale     # noqa: E402
import scaling   # noqa: E402
import surgeon   # noqa: E402

# (hidden, ffn, blocks, heads, vocabulary): published OPT shapes; "tiny" for --cpu
SHAPES = {"OPT-125m": (768, 3072, 12, 12, 50272), "OPT-1.3B": (2048, 8192, 24, 32, 50272),
          "tiny": (32, 64, 2, 2, 100)}
# (structure, sparsity, shots, low-rank steps): the paper's rows and columns and 2:4
RUNS = {"rowcol": ("rowcol", 0.3, 24, 3), "2:4": ("2:4", 0.5, 5, 0)}


class Enough(Exception):
    """Raised after the shots that are timed; the rest is extrapolated."""


def opt_model(shape, dtype, device):
    from transformers import OPTConfig, OPTForCausalLM
    d, f, blocks, heads, vocab = SHAPES[shape]
    config = OPTConfig(hidden_size=d, ffn_dim=f, num_hidden_layers=blocks, num_attention_heads=heads,
                       vocab_size=vocab, word_embed_proj_dim=d, max_position_embeddings=2048)
    torch.manual_seed(0)
    with torch.device(device):
        model = OPTForCausalLM(config).to(dtype).eval()
    model.config.use_cache = False
    return model


def predicted_bytes(model, layers, structure, device, seqlen):
    """The memory model (benchmarks/scaling.py): model + factors + the larger of one window's
    activations and costs + the largest layer's float64 workspace."""
    rec = surgeon.Recorder(device)                               # which layers share an input
    ids = torch.zeros(1, 2, dtype=torch.long, device=device)
    with surgeon.frozen_with_hooks(model, {l: rec.forward_hook(n) for n, l in layers.items()}), \
            torch.no_grad():
        rec.start_batch(ids)
        model(ids)
    parts = scaling.predict(layers, rec.source, structure)
    size = next(model.parameters()).element_size()
    parts["model"] = sum(p.numel() for p in model.parameters()) * size
    c = model.config
    parts["activations"] = scaling.activation_bytes(seqlen, c.vocab_size, c.hidden_size, c.ffn_dim,
                                                    c.num_hidden_layers, size)
    return parts


def timed_run(shape, run, args, device):
    """The first shots of one run; seconds per stage, extrapolated seconds, peak memory."""
    structure, sparsity, shots, lora_steps = RUNS[run]
    timed = min(shots, args.shots_rowcol if run == "rowcol" else
                (args.shots_24_large if shape == "OPT-1.3B" else shots))
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    model = opt_model(shape, dtype, device)
    layers = surgeon.prunable_layers(model)
    vocab = SHAPES[shape][4]
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, vocab, (1, args.seqlen), generator=gen).to(device)
               for _ in range(args.nsamples)]
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    records = []

    def on_shot(record):
        if cuda:
            torch.cuda.synchronize()
        records.append(record)
        print(f"  {shape} {run} shot {record['shot']}/{shots}: sparsity "
              f"{record['sparsity']:.4f}  " + "  ".join(f"{k} {v:.1f}s" for k, v in
                                                    record["seconds"].items()), flush=True)
        if len(records) == timed:
            raise Enough

    settings = surgeon.Settings(sparsity=sparsity, structure=structure, shots=shots,
                                lora_steps=lora_steps)
    tic = time.perf_counter()
    try:
        scale.prune(model, batches, settings, on_shot=on_shot)
    except Enough:
        pass
    seconds = time.perf_counter() - tic
    peak = torch.cuda.max_memory_allocated(device) if cuda else None
    parts = predicted_bytes(model, layers, structure, device, args.seqlen)
    with torch.no_grad():
        loss = float(surgeon.next_token_loss(model, batches[0]))
    stages = {}
    for record in records:
        for k, v in record["seconds"].items():
            stages[k] = stages.get(k, 0.0) + v
    out = {"shape": shape, "run": run, "dtype": str(dtype).replace("torch.", ""),
           "params": sum(p.numel() for p in model.parameters()), "shots": shots,
           "shots_timed": len(records), "windows": f"{args.nsamples} x {args.seqlen}",
           "seconds_timed": round(seconds, 2),
           "seconds_per_shot": {k: round(v / len(records), 2) for k, v in stages.items()},
           "seconds_all_shots_extrapolated": round(seconds / len(records) * shots, 1),
           "sparsity_reached": round(records[-1]["sparsity"], 5),
           "target_reached": round(records[-1]["target"], 5),
           "loss_after": round(loss, 4),
           "peak_gpu_mb": round(peak / 2**20, 1) if peak else None,
           "predicted_mb": {k: round(v / 2**20, 1) for k, v in parts.items()},
           "predicted_peak_mb": round(scaling.peak_bytes(parts) / 2**20, 1)}
    del model, layers, batches
    if cuda:
        torch.cuda.empty_cache()
    return out


def run_suite(device, timeout):
    """pytest with --device DEVICE; returns its closing line and exit code."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--device", str(device)]
    tic = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as err:
        out = (err.stdout or b"").decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
        proc = subprocess.CompletedProcess(cmd, -1, out + f"\ntimed out after {timeout} s", "")
    lines = proc.stdout.strip().splitlines()
    failed = [line for line in lines if line.startswith("FAILED")]
    return {"command": " ".join(cmd[1:]), "exit_code": proc.returncode,
            "summary": lines[-1] if lines else proc.stderr[-500:], "failed": failed[:20],
            "seconds": round(time.perf_counter() - tic, 1)}


def table(record):
    lines = ["| shape | run | dtype | shots timed | s a shot (curvature / costs / updates / lora) "
             "| s all shots (extrapolated) | peak GPU MB | predicted MB |", "|---|---|---|---|---|---|---|---|"]
    for r in record["runs"]:
        s = r["seconds_per_shot"]
        per = " / ".join(f"{s.get(k, 0):.1f}" for k in ("curvature", "costs", "updates", "lora"))
        peak = f"{r['peak_gpu_mb']:.0f}" if r["peak_gpu_mb"] else "-"
        lines.append(f"| {r['shape']} | {r['run']} | {r['dtype']} | {r['shots_timed']} of "
                     f"{r['shots']} | {per} | {r['seconds_all_shots_extrapolated']:.0f} | {peak} "
                     f"| {r['predicted_peak_mb']:.0f} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cpu", action="store_true", help="tiny shapes on the CPU (CI)")
    p.add_argument("--json", help="write the record here")
    p.add_argument("--nsamples", type=int, help="calibration windows (default 128; --cpu 4)")
    p.add_argument("--seqlen", type=int, help="tokens a window (default 2048; --cpu 32)")
    p.add_argument("--shots-rowcol", type=int, default=2, help="rows-and-columns shots timed")
    p.add_argument("--shots-24-large", type=int, default=1,
                   help="2:4 shots timed on OPT-1.3B (OPT-125m: all 5)")
    p.add_argument("--skip-suite", action="store_true", help="do not run the test suite")
    p.add_argument("--suite-timeout", type=int, default=240, help="seconds the suite may take")
    args = p.parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        sys.exit("error: torch sees no CUDA device; --cpu runs the check on tiny shapes")
    device = torch.device("cpu" if args.cpu else "cuda")
    args.nsamples = args.nsamples or (4 if args.cpu else 128)
    args.seqlen = args.seqlen or (32 if args.cpu else 2048)
    record = {"command": " ".join(["python", "benchmarks/gpu_check.py", *(argv or sys.argv[1:])]),
              "provenance": run_opt.provenance(),
              "versions": {"torch": torch.__version__,
                           "cuda": torch.version.cuda if not args.cpu else None},
              "device": torch.cuda.get_device_name() if not args.cpu else "cpu",
              "suite": None, "runs": []}

    def write():
        if args.json:
            with open(args.json, "w") as f:
                json.dump(record, f, indent=1)

    print(f"gpu_check on {record['device']}, torch {torch.__version__}", flush=True)
    if not (args.cpu or args.skip_suite):
        record["suite"] = run_suite(device, args.suite_timeout)
        print(f"test suite with --device cuda: {record['suite']['summary']} "
              f"({record['suite']['seconds']} s)", flush=True)
        for line in record["suite"]["failed"]:
            print("  " + line)
        write()
    shapes = ["tiny"] if args.cpu else ["OPT-125m", "OPT-1.3B"]
    with scale.highest_precision():
        for shape in shapes:
            for run in RUNS:
                record["runs"].append(timed_run(shape, run, args, device))
                write()
    print(table(record))
    return record


if __name__ == "__main__":
    main()

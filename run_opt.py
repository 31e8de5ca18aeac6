"""Prune an OPT or Llama-family model with The LLM Surgeon and measure its perplexity.

    python run_opt.py --model facebook/opt-125m --sparsity 0.3

loads the model in float32, calibrates on WikiText-2 (128 random windows of 2048 tokens of the
train split), prunes (rows and columns, 40 shots, by default), and evaluates perplexity on the
test split before and after, as SparseGPT and the paper do. --model also takes a local folder and
--train-file / --test-file local plain text, so the same command runs without a hub.
"""
import argparse
import json
import math
import os
import platform
import random
import re
import resource
import sys
import time

import torch

import compact as compaction
import surgeon

WIKITEXT = ("Salesforce/wikitext", "wikitext-2-raw-v1")


class Parser(argparse.ArgumentParser):
    def error(self, message):                       # one line, no usage block
        fail(message)


def fail(message):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def fraction(text):
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"sparsity must be in [0, 1), got {text}")
    return value


def positive(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def parse_args(argv=None):
    p = Parser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="facebook/opt-125m", help="hub id or local folder")
    p.add_argument("--sparsity", type=fraction, default=0.3,
                   help="fraction of the pruned layers' weights to remove; 0 only evaluates")
    p.add_argument("--structure", choices=surgeon.STRUCTURES, default="rowcol",
                   help="what is removed: single weights, 2 of every 4, or whole rows and columns")
    p.add_argument("--method", choices=surgeon.METHODS, default="surgeon",
                   help="LLM Surgeon, or a baseline (K-OBD, L-OBD, magnitude) from the same loop")
    p.add_argument("--shots", type=positive, help="pruning shots (default 40 rowcol, 5 otherwise)")
    p.add_argument("--nsamples", type=positive, default=128, help="calibration windows")
    p.add_argument("--seqlen", type=positive,
                   help="tokens per window (default min(2048, the model's context))")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration windows")
    p.add_argument("--train-file", help="local text for calibration instead of WikiText-2 train")
    p.add_argument("--test-file", help="local text for evaluation instead of WikiText-2 test")
    p.add_argument("--eval-windows", type=positive, help="evaluate only the first N windows")
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    p.add_argument("--damp-a", type=float, default=0.01, help="damping of A, relative")
    p.add_argument("--damp-g", type=float, help="damping of G, relative (default 0.01 rowcol, 0.1 otherwise)")
    p.add_argument("--max-correlate", type=positive, default=2000,
                   help="most removed weights solved together in an element update")
    p.add_argument("--curvature-device",
                   help="where the KFAC factors live (default: the model's device; cpu keeps "
                        "them in host memory)")
    p.add_argument("--eval-every-shot", action="store_true", help="perplexity after every shot")
    p.add_argument("--skip-dense-eval", action="store_true",
                   help="do not evaluate the dense model (a grid that measured it once)")
    p.add_argument("--compact", action="store_true",
                   help="after rowcol pruning, cut dead units and heads out; measure the speed-up")
    p.add_argument("--save", metavar="DIR", help="save the pruned model and tokenizer here")
    p.add_argument("--json", metavar="PATH", help="write settings and results as JSON here")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------
# Loading


COMPACT = "compact.json"


def load(name, device="cpu"):
    """Model and tokenizer from a hub id or folder, compacted folders included."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        if os.path.isfile(os.path.join(name, COMPACT)):
            model = load_compact(name)
        else:
            model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32)
    except Exception as err:                        # unknown id, no network, broken folder
        first = str(err).strip().split("\n")[0]
        fail(f"cannot load model {name!r} ({first}). Without a hub, pass a local folder with "
             "--model /path/to/folder")
    model.config.use_cache = False
    return model.to(device).eval(), tokenizer


def save_compact(model, tokenizer, folder, shapes):
    """save_pretrained, plus the shapes that `load_compact` rebuilds. config.json's model_type
    is renamed so that plain from_pretrained, which would build the dense shapes, stops with a
    message that names the loader."""
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        config = json.load(f)
    with open(os.path.join(folder, COMPACT), "w") as f:
        json.dump({"model_type": config["model_type"], **shapes}, f)
    config["model_type"] = (f"{config['model_type']}-compacted; load with "
                            "run_opt.load(folder) from github llm-surgeon")
    with open(path, "w") as f:
        json.dump(config, f, indent=1)


def load_compact(folder):
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM
    with open(os.path.join(folder, COMPACT)) as f:
        spec = json.load(f)
    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    config.pop("model_type")
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(spec["model_type"], **config),
                                             dtype=torch.float32)
    compaction.resize(model, spec)
    state = {}
    for file in sorted(os.listdir(folder)):
        if file.endswith(".safetensors"):
            state.update(load_file(os.path.join(folder, file)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    head = [n for n, m in model.named_modules() if m is model.get_output_embeddings()]
    tied = {f"{head[0]}.weight"} if model.config.tie_word_embeddings and head else set()
    if unexpected or set(missing) - tied:
        raise ValueError(f"{folder} does not match its {COMPACT}: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}")
    model.tie_weights()
    return model


def token_ids(tokenizer, path, split):
    """One long id tensor: a local text file, or WikiText-2 joined as SparseGPT does."""
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except OSError as err:
            fail(f"cannot read {path}: {err.strerror}")
        return tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    try:
        from datasets import load_dataset
        data = load_dataset(*WIKITEXT, split=split)
    except Exception as err:
        first = str(err).strip().split("\n")[0]
        fail(f"cannot load WikiText-2 ({first}). Without a hub, pass local text with "
             "--train-file and --test-file")
    joined = (" " if split == "train" else "\n\n").join(data["text"])
    return tokenizer(joined, return_tensors="pt").input_ids[0]


def calibration_windows(ids, nsamples, seqlen, seed, source):
    if len(ids) <= seqlen:
        fail(f"{source} has {len(ids)} tokens, fewer than one calibration window of {seqlen + 1}")
    rng = random.Random(seed)                       # SparseGPT's sampler
    starts = [rng.randint(0, len(ids) - seqlen - 1) for _ in range(nsamples)]
    return [ids[i:i + seqlen][None] for i in starts]


def eval_windows(ids, seqlen, limit, source):
    n = len(ids) // seqlen                          # non-overlapping, tail dropped
    if n == 0:
        fail(f"{source} has {len(ids)} tokens, fewer than one evaluation window of {seqlen}")
    return [ids[i * seqlen:(i + 1) * seqlen][None] for i in range(min(n, limit or n))]


# ----------------------------------------------------------------------------------------------
# Measuring


@torch.no_grad()
def perplexity(model, windows, device, desc="eval"):
    """exp of the mean over windows of each window's mean next-token NLL."""
    from tqdm import tqdm
    nll = [float(surgeon.next_token_loss(model, w.to(device)))
           for w in tqdm(windows, desc=desc, leave=False, file=sys.stderr)]
    return math.exp(sum(nll) / len(nll))


@torch.no_grad()
def latency_ms(model, batch, runs=5):
    """Median wall time of a forward pass over `batch`, after one warm-up run."""
    sync = torch.cuda.synchronize if batch.is_cuda else (lambda: None)
    times = []
    for _ in range(runs + 1):
        sync()
        tic = time.perf_counter()
        model(batch)
        sync()
        times.append(1000 * (time.perf_counter() - tic))
    return sorted(times[1:])[runs // 2]


def peak_memory_mb(device):
    if str(device).startswith("cuda"):
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024     # Linux: KiB


def sparsity_table(layers: dict[str, float]) -> str:
    """Blocks as rows, layer kinds (q_proj, fc1, ...) as columns, percent zero."""
    grid, kinds = {}, []
    for name, value in layers.items():
        block = re.search(r"\.(\d+)\.", name)
        kind = name.split(".")[-1]
        kinds += [kind] if kind not in kinds else []
        grid.setdefault(block.group(1) if block else "-", {})[kind] = value
    lines = ["block " + " ".join(f"{k[:8]:>8}" for k in kinds)]
    for block, row in grid.items():
        lines.append(f"{block:>5} " + " ".join(
            f"{100 * row[k]:7.1f}%" if k in row else " " * 8 for k in kinds))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    settings = surgeon.Settings(sparsity=args.sparsity, structure=args.structure,
                                method=args.method, shots=args.shots, damp_a=args.damp_a,
                                damp_g=args.damp_g, max_correlate=args.max_correlate,
                                curvature_device=args.curvature_device)
    record = {"settings": {**vars(args), "shots": settings.shots, "damp_g": settings.damp_g,
                           "device": str(device)},
              "versions": {"python": platform.python_version(), "torch": torch.__version__},
              "seconds": {}, "peak_memory_mb": {}}
    try:
        surgeon.check(settings)
    except ValueError as err:
        fail(str(err))
    import transformers
    transformers.utils.logging.disable_progress_bar()
    record["versions"]["transformers"] = transformers.__version__

    def stage(name, tic):
        record["seconds"][name] = round(time.perf_counter() - tic, 2)
        record["peak_memory_mb"][name] = round(peak_memory_mb(device), 1)
        return time.perf_counter()

    tic = time.perf_counter()
    model, tokenizer = load(args.model, device)
    context = getattr(model.config, "max_position_embeddings", None) or 2048
    if args.seqlen and args.seqlen > context:
        fail(f"--seqlen {args.seqlen} is longer than the model's context ({context})")
    seqlen = args.seqlen or min(2048, context)
    layers = surgeon.prunable_layers(model)
    n_params = sum(p.numel() for p in model.parameters())
    n_pruned = sum(l.weight.numel() for l in layers.values())
    print(f"model {args.model}: {n_params / 1e6:.1f}M parameters, {len(layers)} prunable layers "
          f"({n_pruned / 1e6:.1f}M weights), on {device}")
    tic = stage("load", tic)

    test_source = args.test_file or "WikiText-2 test"
    test = eval_windows(token_ids(tokenizer, args.test_file, "test"), seqlen, args.eval_windows,
                        test_source)
    calib = []
    if args.sparsity > 0 and args.method != "magnitude":
        train_source = args.train_file or "WikiText-2 train"
        calib = calibration_windows(token_ids(tokenizer, args.train_file, "train"),
                                    args.nsamples, seqlen, args.seed, train_source)
        print(f"calibration: {len(calib)} windows of {seqlen} tokens from {train_source}, "
              f"seed {args.seed}")
    calib = [w.to(device) for w in calib]
    if args.sparsity > 0:
        try:
            surgeon.check(settings, layers, calib)
        except ValueError as err:
            fail(str(err))
    tic = stage("data", tic)

    compact = args.compact and args.sparsity > 0
    if args.compact and args.structure != "rowcol":
        print(f"--compact: nothing to compact, {args.structure} pruning leaves no whole rows or "
              "columns; the zeros stay in place")
        compact = False
    if compact:
        batch = torch.cat(test[:8]).to(device)
        record["params_dense"] = n_params
        record["latency_ms_dense"] = latency_ms(model, batch)
        print(f"forward latency, batch {tuple(batch.shape)}: {record['latency_ms_dense']:.0f} ms")
        tic = stage("latency_dense", tic)

    print(f"evaluation: {len(test)} windows of {seqlen} tokens from {test_source}")
    record["ppl_dense"] = None
    if not (args.skip_dense_eval and args.sparsity > 0):
        record["ppl_dense"] = perplexity(model, test, device, "eval dense")
        print(f"{'perplexity' if args.sparsity == 0 else 'dense perplexity'}: "
              f"{record['ppl_dense']:.2f}")
        tic = stage("eval_dense", tic)

    if args.sparsity > 0:
        from tqdm import tqdm
        print(f"pruning {args.sparsity:.0%} {args.structure} with {args.method}, "
              f"{settings.shots} shots")

        def on_shot(shot):
            line = (f"shot {shot['shot']}/{settings.shots}: sparsity {shot['sparsity']:.4f}  "
                    + "  ".join(f"{k} {v:.1f}s" for k, v in shot["seconds"].items()))
            if args.eval_every_shot:
                shot["ppl"] = perplexity(model, test, device, f"eval shot {shot['shot']}")
                line += f"  ppl {shot['ppl']:.2f}"
            tqdm.write(line)

        progress = lambda it, desc: tqdm(it, desc=desc, leave=False, file=sys.stderr)
        try:
            report = surgeon.prune(model, calib, settings, on_shot=on_shot, progress=progress)
        except ValueError as err:
            notes = " ".join(getattr(err, "__notes__", []))
            fail(f"{err} {notes}".strip())
        tic = stage("prune", tic)
        record["ppl_pruned"] = perplexity(model, test, device, "eval pruned")
        tic = stage("eval_pruned", tic)
        record.update(sparsity=report["sparsity"], layers=report["layers"], shots=report["shots"])
        print("sparsity per layer (percent zero):\n" + sparsity_table(report["layers"]))
        print(f"sparsity: {report['sparsity']:.4f} of {n_pruned / 1e6:.1f}M weights")
        dense = "not evaluated" if record["ppl_dense"] is None else f"{record['ppl_dense']:.2f}"
        print(f"perplexity: dense {dense} -> pruned {record['ppl_pruned']:.2f}")
    else:
        record.update(ppl_pruned=record["ppl_dense"], sparsity=surgeon.overall_sparsity(layers),
                      layers=surgeon.layer_sparsity(layers), shots=[])

    if compact:
        report = compaction.compact(model)
        record["compact"] = {k: v for k, v in report.items() if k != "shapes"}
        record["params_compact"] = report["params_after"]
        record["latency_ms_compact"] = latency_ms(model, batch)
        record["ppl_compact"] = perplexity(model, test, device, "eval compact")
        print(f"compacted: {report['mlp_units_removed']} MLP units and {report['heads_removed']} "
              f"heads removed; {report['zero_columns_kept']} zero input columns and "
              f"{report['zeros_kept']} zero weights kept in place")
        print(f"parameters: dense {n_params / 1e6:.2f}M -> compact "
              f"{report['params_after'] / 1e6:.2f}M ({report['params_after'] / n_params:.1%})")
        print(f"forward latency: dense {record['latency_ms_dense']:.0f} ms -> compact "
              f"{record['latency_ms_compact']:.0f} ms "
              f"({record['latency_ms_dense'] / record['latency_ms_compact']:.2f}x)")
        print(f"perplexity: pruned {record['ppl_pruned']:.3f} -> compact "
              f"{record['ppl_compact']:.3f}")
        tic = stage("compact", tic)

    if args.save:
        if compact:
            save_compact(model, tokenizer, args.save, report["shapes"])
        else:
            model.save_pretrained(args.save)
            tokenizer.save_pretrained(args.save)
        print(f"saved to {args.save}")
        tic = stage("save", tic)
    print("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in record["seconds"].items())
          + f"; peak memory {max(record['peak_memory_mb'].values()):.0f} MB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1)
    return record


if __name__ == "__main__":
    main()

"""Prune an OPT or Llama-family model with The LLM Surgeon and measure its perplexity.

    python run_opt.py --model facebook/opt-125m --sparsity 0.3
    torchrun --nproc-per-node 4 run_opt.py ...          # several processes (GPUs), same weights

loads the model (float32 on CPU, the checkpoint's own dtype on CUDA), calibrates on WikiText-2
(128 random windows of 2048 tokens of the train split), prunes (rows and columns in shots of
1.25%, by default), and evaluates perplexity on the test split before and after, as SparseGPT
and the paper do. --model also takes a local folder and --train-file / --test-file local plain
text, so the same command runs without a hub.
"""
import atexit
import copy
import ctypes
import functools
import gc
import json
import math
import os
import platform
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager

import torch

import command
import compact as compaction
import gguf_export
import scale
import surgeon
import zeroshot
from command import (CHECKPOINT, Interrupted, Terminated, compacted_quietly, fail,
                     loading, main_rank, mark_saved, parse_args, pruned_structure, pruning_kept,
                     read_checkpoint, read_text, saved_shots, sparsity_table, start_ranks,
                     validate, working, world_size, write_checkpoint)

WIKITEXT = ("Salesforce/wikitext", "wikitext-2-raw-v1")


# ----------------------------------------------------------------------------------------------
# The pipeline: load, calibrate, prune, evaluate, save. `run` is the command line's; the peers in
# benchmarks/ run the same `pipeline` with their own Pruner.

RECORD = {              # the fields of the JSON record (--json), written down in one place
    "settings": "every flag's value after defaults, and the device",
    "versions": "python, torch, transformers",
    "provenance": "commit, dirty, threads, cpus, world_size, load_average, started",
    "seconds": "each stage's wall time: data, load, eval_dense, prune, eval_pruned, compact, save",
    "peak_memory_mb": "each stage's peak (CUDA: allocated; CPU: the process's resident size)",
    "peak_memory_mb_ranks": "several processes: each rank's peak_memory_mb",
    "params_dense": "the model's parameters as loaded",
    "model_dtype": "the dtype of the weights as loaded",
    "pruned_weights": "the weights of the pruned layers (sparsity is a fraction of them)",
    "sparsity_before": "fraction of the pruned layers' weights that were zero as loaded",
    "ppl_dense": "perplexity before pruning (None with --skip-dense-eval)",
    "ppl_pruned": "perplexity after pruning (after the last shot)",
    "sparsity": "fraction of the pruned layers' weights that are zero at the end",
    "units_removed": "--structure units: fraction of the pruned layers' weights in removed heads "
                     "and MLP units, what compaction removes (the target counts these)",
    "layers": "each pruned layer's fraction of zero weights",
    "shots": "each shot: shot, target, sparsity, units_removed (units), seconds of each part, "
             "ppl where evaluated; --save-every: saved (the folder) and with --compact "
             "params_compact",
    "resumed": "--resume: from_shot, and prune_seconds_all_shots over the earlier runs too",
    "latency_ms_pruned": "--compact: forward latency of 8 test windows before compaction",
    "latency_ms_compact": "--compact: the same after compaction",
    "ppl_compact": "--compact: perplexity after compaction",
    "params_compact": "--compact: the model's parameters after compaction",
    "compact": "--compact: params_before/after, mlp_units_removed, mlp_units_padded, "
               "heads_removed, zeros_kept, zero_columns_kept",
    "tasks_dense": "--tasks: {task: {acc, acc_norm}} of the dense model (lm-eval, zero-shot)",
    "tasks_pruned": "--tasks: the same of the pruned model (compacted with --compact)",
    "gguf": "--gguf: path, arch (llama or deci), type, params, each layer's widths, padding",
}                       # a peer's Pruner adds its own (SliceGPT: width, blocks_weights_kept, ...)


def run(argv=None):
    """The command line: the arguments checked before anything loads, then the pipeline."""
    args = parse_args(argv)
    device, settings = validate(args)
    return pipeline(args, device, Surgeon(args, settings))


class Pruner:
    """What the pipeline asks of a pruning method (run_opt's is Surgeon). Before the model
    loads, `check` sees the calibration windows; `prune` prunes the loaded model in place and
    returns a report {sparsity, layers, shots}; `after` may change the pruned model (compaction)
    and returns what `save` needs. `check_model` sees the loaded layers before anything runs."""
    calibrate = True            # whether it needs calibration windows
    prunes = True               # False: the pipeline only evaluates

    def check(self, args, calib):
        pass

    def check_model(self, model, layers, calib):
        pass

    def prune(self, model, layers, calib, test, device, record) -> dict:
        raise NotImplementedError

    def after(self, model, test, device, record):
        """After pruning, or in place of it where nothing is pruned: what may change the model
        (compaction); returns what `save` needs of it."""
        return None

    def save(self, model, tokenizer, folder, after, record):
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)


def pipeline(args, device, pruner: Pruner):
    """Load (args.model, args.dtype, args.device_map), calibrate and evaluate (args.train_file,
    test_file, nsamples, seqlen, seed, eval_windows), prune with `pruner`, evaluate again, save
    (args.save) and write the record (args.json, fields in RECORD). Returns the record."""
    start_ranks(device)
    record = new_record(args, device)
    with stage(record, "data", device):            # the text is checked before the model loads
        tokenizer, context = load_tokenizer(args.model)
        test, calib = load_data(args, tokenizer, context, pruner.prunes and pruner.calibrate)
        pruner.check(args, calib)
    with stage(record, "load", device):
        model, layers = load_stage(args, device, record)
        calib = [w.to(device) for w in calib]
        release_memory()
        if pruner.prunes:
            pruner.check_model(model, layers, calib)
    record["ppl_dense"] = None
    if not pruner.prunes or not args.skip_dense_eval:
        with stage(record, "eval_dense", device):
            record["ppl_dense"] = perplexity(model, test, device, "eval dense")
        print(f"{'perplexity' if not pruner.prunes else 'dense perplexity'}: "
              f"{record['ppl_dense']:.2f}")
        record["tasks_dense"] = zero_shot(args, model, tokenizer, record, device, "dense")
    record.update(ppl_pruned=record["ppl_dense"], sparsity=record["sparsity_before"],
                  layers=surgeon.layer_sparsity(layers), shots=[])
    if pruner.prunes:
        with stage(record, "prune", device):
            report = pruner.prune(model, layers, calib, test, device, record)
    with pruning_kept(model, tokenizer, args.save, record, pruner.prunes):   # whatever fails now
        if pruner.prunes:
            with stage(record, "eval_pruned", device):
                last = report["shots"][-1] if report["shots"] else {}
                record["ppl_pruned"] = last["ppl"] if "ppl" in last else \
                    perplexity(model, test, device, "eval pruned")  # evaluated after its last shot
            record.update(sparsity=report["sparsity"], layers=report["layers"],
                          shots=report["shots"])
            print_pruned(record, layers)
        after = pruner.after(model, test, device, record)
        if pruner.prunes:
            record["tasks_pruned"] = zero_shot(args, model, tokenizer, record, device, "pruned")
        if args.save and main_rank():
            with stage(record, "save", device):
                pruner.save(model, tokenizer, args.save, after, record)
                mark_saved(args.save, record["settings"], record["ppl_pruned"])
        if getattr(args, "gguf", None) and main_rank():
            with stage(record, "gguf", device):
                record["gguf"] = gguf_export.write(model, tokenizer, args.gguf, args.gguf_type)
            print(gguf_export.summary(record["gguf"]))
    gather_peaks(record)
    print("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in record["seconds"].items())
          + f"; peak memory {max(record['peak_memory_mb'].values()):.0f} MB")
    if args.json and main_rank():
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1)
    if world_size() > 1:                      # every rank done before any leaves (main)
        torch.distributed.barrier()
    return record


class Surgeon(Pruner):
    """LLM Surgeon (scale.prune) with run_opt's flags: checkpoints and resume, --eval-every,
    --compact (of the pruned model, or with --sparsity 0 of the model as loaded)."""

    def __init__(self, args, settings):
        self.args, self.settings = args, settings
        self.prunes = args.sparsity > 0
        self.calibrate = args.method != "magnitude" or args.lora_steps > 0
        self.compact = args.compact and (args.structure in surgeon.LINES or not self.prunes)
        self.saved_shots = saved_shots(args, settings)
        if args.compact and not self.compact:
            print(f"--compact: nothing to compact, {args.structure} pruning leaves no whole rows "
                  "or columns; the zeros stay in place")

    def check(self, args, calib):
        command.check_shapes(args, self.settings, calib)

    def check_model(self, model, layers, calib):
        try:                                         # the structure, built once and checked
            self.structure = pruned_structure(self.args, model)
            scale.check(self.settings, layers, calib, self.structure)
        except ValueError as err:
            fail(str(err))

    def prune(self, model, layers, calib, test, device, record):
        keep = None
        if self.saved_shots:                        # the tokenizer, read once for every copy
            tokenizer = load_tokenizer(self.args.model)[0]
            keep = functools.partial(self.save_shot, model, tokenizer, record=record)
        report = prune_stage(self.args, self.settings, model, layers, calib, test, device, keep,
                             self.structure)
        if "units_removed" in report:
            record["units_removed"] = report["units_removed"]
        if report["first_shot"] > 1:             # "prune" timed only this process's shots
            record["resumed"] = {"from_shot": report["first_shot"],
                                 "prune_seconds_all_shots": round(sum(
                                     sum(shot["seconds"].values()) for shot in report["shots"]), 2)}
        return report

    def after(self, model, test, device, record):
        if self.args.checkpoint and self.prunes and main_rank():
            path = os.path.join(self.args.checkpoint, CHECKPOINT)
            print(f"checkpoint of the last shot kept in {path} "
                  f"({os.path.getsize(path) / 2**20:.0f} MB); delete it when the run is no "
                  "longer needed")
        if self.compact:
            with stage(record, "compact", device):
                return compact_stage(model, test, device, record, self.args.compact_multiple)
        return None

    def save_shot(self, model, tokenizer, shot, record):
        """--save-every K: a copy of the model after shot K, 2K, ... (the last is --save's) in
        DIR-shot-K, compacted as the last one is, while pruning goes on."""
        if shot["shot"] not in self.saved_shots or not main_rank():
            return
        tic, folder = time.perf_counter(), f"{self.args.save}-shot-{shot['shot']}"
        model, shapes = copy.deepcopy(model), None
        if self.compact:
            report = compaction.compact(model, self.args.compact_multiple)
            shot["params_compact"], shapes = report["params_after"], report["shapes"]
        self.save(model, tokenizer, folder, shapes, record)
        mark_saved(folder, record["settings"], shot.get("ppl"), shot=shot["shot"],
                   sparsity=shot["sparsity"])
        shot["saved"] = folder
        shot["seconds"]["save"] = time.perf_counter() - tic

    def save(self, model, tokenizer, folder, shapes, record):
        if shapes:
            compaction.save(model, tokenizer, folder, shapes)
        else:
            super().save(model, tokenizer, folder, shapes, record)


# ----------------------------------------------------------------------------------------------
# The record: settings, provenance, seconds and peak memory of every stage


def zero_shot(args, model, tokenizer, record, device, which):
    """--tasks: lm-eval's zero-shot accuracy of the model as it is now (rank 0 alone)."""
    if not getattr(args, "tasks", None) or not main_rank():     # the peers' flags have none
        return None
    with stage(record, f"tasks_{which}", device):
        results = zeroshot.evaluate(model, tokenizer, args.tasks, args.task_dir)
    print(f"zero-shot accuracy, {which}: {zeroshot.summary(results)}")
    return results


def new_record(args, device):
    import transformers
    transformers.utils.logging.disable_progress_bar()
    return {"settings": {**vars(args), "device": str(device)},
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "transformers": transformers.__version__},
            "provenance": provenance(),
            "seconds": {}, "peak_memory_mb": {}}


def provenance():
    """Which code ran, where and when: the git commit (and whether its Python files had
    uncommitted changes), torch's thread count, the CPU count, the load average at the start
    (another job on the cores shows there) and the start time."""
    def git(*cmd):
        try:
            return subprocess.run(["git", *cmd], cwd=os.path.dirname(os.path.abspath(__file__)),
                                  capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    return {"commit": git("rev-parse", "HEAD") or None,
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no", "--", "*.py")),
            "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
            "world_size": world_size(),
            "load_average": [round(x, 2) for x in os.getloadavg()],
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def gather_peaks(record):
    """Several ranks: each one's peak memory of every stage, as record["peak_memory_mb_ranks"]."""
    if world_size() > 1:
        peaks = [None] * world_size()
        torch.distributed.all_gather_object(peaks, record["peak_memory_mb"])
        record["peak_memory_mb_ranks"] = peaks


@contextmanager
def timed(seconds: dict, name: str):
    tic = time.perf_counter()
    yield
    seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - tic


@contextmanager
def stage(record, name, device):
    """Seconds and peak memory of one stage, into the record."""
    with timed(record["seconds"], name):
        yield
    record["seconds"][name] = round(record["seconds"][name], 2)
    record["peak_memory_mb"][name] = round(peak_memory_mb(device), 1)


# ----------------------------------------------------------------------------------------------
# Data: local text or WikiText-2, tokenized once, cut into windows as SparseGPT does


def load_tokenizer(name):
    """The tokenizer and the model's context length, without loading the weights."""
    from transformers import AutoConfig, AutoTokenizer
    with loading(name), compacted_quietly(name):
        tokenizer = AutoTokenizer.from_pretrained(        # a compacted folder: our own code
            name, trust_remote_code=compaction.is_compacted(name))
        if os.path.isdir(name):                     # compacted folders too: plain JSON
            with open(os.path.join(name, "config.json")) as f:
                config = json.load(f)
        else:
            config = AutoConfig.from_pretrained(name).to_dict()
    return tokenizer, config.get("max_position_embeddings") or 2048


def load_data(args, tokenizer, context, calibrate=True):
    """Evaluation windows, and calibration windows where pruning needs them (on the CPU)."""
    if args.seqlen and args.seqlen > context:
        fail(f"--seqlen {args.seqlen} is longer than the model's context ({context})")
    seqlen = args.seqlen or min(2048, context)
    source = args.test_file or "WikiText-2 test"
    test = eval_windows(token_ids(tokenizer, args.test_file, "test"), seqlen, args.eval_windows,
                        source)
    print(f"evaluation: {len(test)} windows of {seqlen} tokens from {source}")
    calib = []
    if calibrate:
        source = args.train_file or "WikiText-2 train"
        calib = calibration_windows(token_ids(tokenizer, args.train_file, "train"),
                                    args.nsamples, seqlen, args.seed, source)
        print(f"calibration: {len(calib)} windows of {seqlen} tokens from {source}, "
              f"seed {args.seed}")
    return test, calib


def token_ids(tokenizer, path, split):
    """One long id tensor: a local text file, or WikiText-2 joined as SparseGPT does."""
    if path:
        text = read_text(path)
        with working(f"tokenize {os.path.basename(path)}"):
            return tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    try:
        from datasets import load_dataset
        data = load_dataset(*WIKITEXT, split=split)
    except Exception as err:
        fail(f"cannot load WikiText-2 ({command.one_line(err)}). Without a hub, pass local text "
             "with --train-file and --test-file")
    joined = (" " if split == "train" else "\n\n").join(data["text"])
    with working(f"tokenize WikiText-2 {split}"):
        return tokenizer(joined, return_tensors="pt").input_ids[0]


def eval_windows(ids, seqlen, limit, source):
    n = len(ids) // seqlen                          # non-overlapping, tail dropped
    if n == 0:
        fail(f"{source} has {len(ids)} tokens, fewer than one evaluation window of --seqlen "
             f"{seqlen}")
    return [ids[i * seqlen:(i + 1) * seqlen][None] for i in range(min(n, limit or n))]


def calibration_windows(ids, nsamples, seqlen, seed, source):
    if len(ids) <= seqlen:
        fail(f"{source} has {len(ids)} tokens; calibration windows of --seqlen {seqlen} need at "
             f"least {seqlen + 1}")
    rng = random.Random(seed)                       # SparseGPT's sampler
    starts = [rng.randint(0, len(ids) - seqlen - 1) for _ in range(nsamples)]
    return [ids[i:i + seqlen][None] for i in starts]


# ----------------------------------------------------------------------------------------------
# The model: a hub id or a folder, on one device or across several (accelerate)


def load_stage(args, device, record):
    model = load_model(args.model, device, getattr(args, "device_map", None), args.dtype)
    layers = surgeon.prunable_layers(model)
    total = sum(layer.weight.numel() for layer in layers.values())
    record["params_dense"] = sum(p.numel() for p in model.parameters())
    record["pruned_weights"] = total
    record["sparsity_before"] = surgeon.overall_sparsity(layers)
    record["model_dtype"] = str(next(model.parameters()).dtype).replace("torch.", "")
    print(f"model {args.model}: {record['params_dense'] / 1e6:.1f}M parameters in "
          f"{record['model_dtype']}, {len(layers)} prunable layers ({total / 1e6:.1f}M weights, "
          f"{record['sparsity_before']:.2%} zero), "
          f"on {device}")
    return model, layers


def load_model(name, device="cpu", device_map=None, dtype="float32"):
    """The model in `dtype` (one of DTYPES; auto: the checkpoint's own), compacted folders
    included. With a device map, accelerate places the model (weights offloaded to disk go to a
    temporary folder)."""
    from transformers import AutoModelForCausalLM
    dtype = dtype if dtype == "auto" else getattr(torch, dtype)
    with loading(name):
        if compaction.is_compacted(name):
            model = compaction.load(name, dtype)
        elif device_map:
            offload = tempfile.mkdtemp(prefix="llm-surgeon-offload-")
            atexit.register(shutil.rmtree, offload, ignore_errors=True)
            model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, device_map=device_map,
                                                         offload_folder=offload)
        else:
            model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
    model.config.use_cache = False
    if device_map:
        scale.offloaded_access(model, offload)
        return model.eval()
    return model.to(device).eval()


def load(name, device="cpu", device_map=None, dtype="float32"):
    """(model, tokenizer) from a hub id or a folder, a compacted one too: what `run_opt.py
    --save` wrote loads with `model, tokenizer = run_opt.load(folder)`."""
    return load_model(name, device, device_map, dtype), load_tokenizer(name)[0]


# ----------------------------------------------------------------------------------------------
# Measuring


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


@torch.no_grad()
def perplexity(model, windows, device, desc="eval"):
    """exp of the mean over windows of each window's mean next-token NLL. Several ranks split
    the windows and gather the NLLs (exactly: each is summed with zeros), then sum them in order."""
    from tqdm import tqdm
    ranks = scale.runtime({})
    nll = torch.zeros(len(windows), dtype=torch.float64)
    for i in tqdm(range(ranks.rank, len(windows), ranks.size), desc=desc, leave=False,
                  file=sys.stderr, disable=not main_rank()):
        nll[i] = float(surgeon.next_token_loss(model, windows[i].to(device)))
    return math.exp(sum(ranks.sum(nll).tolist()) / len(windows))


def peak_memory_mb(device):
    if str(device).startswith("cuda"):
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024     # Linux: KiB


def release_memory():
    """Hand freed memory back to the system (glibc keeps it otherwise), so that one stage's
    temporaries (the tokenizer's, a shot's) do not stack onto the next stage's peak."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):                  # not glibc: nothing to do
        pass


# ----------------------------------------------------------------------------------------------
# Pruning, with a checkpoint after every shot (command.py writes and reads them)


def prune_stage(args, settings, model, layers, calib, test, device, keep=None, structure=None):
    """scale.prune with progress, per-shot lines, checkpoints and resume; keep(shot) after each
    shot's evaluation (--save-every); structure: units', where settings.structure's is not it."""
    from tqdm import tqdm
    first, shots = 1, []
    if args.resume:
        first, shots = read_checkpoint(args.checkpoint, args, settings, layers)
        print(f"resuming from {args.checkpoint} after shot {first - 1}")
    print(f"pruning {args.sparsity:.0%} {args.structure} with {args.method}, "
          f"{settings.shots} shot{'s' if settings.shots > 1 else ''}")
    total = sum(layer.weight.numel() for layer in layers.values())

    def removed():                          # units: the fraction in removed heads and MLP units
        return {"units_removed": structure.removed_weights(layers) / total} if structure else {}

    def on_shot(shot):
        shot.update(removed())
        if args.eval_every and (shot["shot"] % args.eval_every == 0
                                or shot["shot"] == settings.shots):
            shot["ppl"] = perplexity(model, test, device, f"eval shot {shot['shot']}")
        if keep:
            keep(shot)
        shots.append(shot)
        release_memory()
        if args.checkpoint and main_rank():
            tic = time.perf_counter()
            write_checkpoint(args.checkpoint, args, settings, layers, shots)
            shot["seconds"]["checkpoint"] = time.perf_counter() - tic
        units = f" (units removed {shot['units_removed']:.4f})" if structure else ""
        tqdm.write(f"shot {shot['shot']}/{settings.shots}: sparsity {shot['sparsity']:.4f}{units}  "
                   + "  ".join(f"{k} {v:.1f}s" for k, v in shot["seconds"].items())
                   + (f"  ppl {shot['ppl']:.2f}" if "ppl" in shot else ""))

    progress = lambda it, desc: tqdm(it, desc=desc, leave=False, file=sys.stderr,  # noqa: E731
                                     disable=not main_rank())
    try:
        report = scale.prune(model, calib, settings, on_shot=on_shot, progress=progress,
                             first_shot=first, structure=structure)
    except ValueError as err:
        fail(f"{err} {' '.join(getattr(err, '__notes__', []))}".strip())
    except KeyboardInterrupt as err:
        raise Interrupted(
            f"the last checkpoint is in {args.checkpoint} (after shot {shots[-1]['shot']}); "
            "run the same command with --resume to go on" if args.checkpoint and shots else
            "no checkpoint was written (--checkpoint DIR keeps one after every shot)",
            terminated=isinstance(err, Terminated)) from None
    last = {"units_removed": shots[-1]["units_removed"]} if structure and shots else removed()
    return {**report, "shots": shots, "first_shot": first, **last}


# ----------------------------------------------------------------------------------------------
# Reporting and saving


def print_pruned(record, layers):
    total = sum(layer.weight.numel() for layer in layers.values())
    if record["layers"]:
        print("sparsity per layer (percent zero):\n" + sparsity_table(record["layers"]))
    print(f"sparsity: {record['sparsity']:.4f} of the pruned layers' {total / 1e6:.1f}M weights")
    if "units_removed" in record:
        print(f"in removed heads and MLP units (what compaction removes): "
              f"{record['units_removed']:.4f} of them")
    dense = "not evaluated" if record["ppl_dense"] is None else f"{record['ppl_dense']:.2f}"
    print(f"perplexity: dense {dense} -> pruned {record['ppl_pruned']:.2f}")


def compact_stage(model, test, device, record, multiple=1):
    """Cut dead units and heads out (MLPs padded to `multiple` units); the forward latency of 8
    test windows is timed just before and just after, so that both see the same load."""
    batch = torch.cat(test[:8]).to(device)
    record["latency_ms_pruned"] = latency_ms(model, batch)
    report = compaction.compact(model, multiple)
    record["compact"] = {k: v for k, v in report.items() if k != "shapes"}
    record["params_compact"] = report["params_after"]
    record["latency_ms_compact"] = latency_ms(model, batch)
    record["ppl_compact"] = perplexity(model, test, device, "eval compact")
    padded = f", {report['mlp_units_padded']} zero MLP units added to reach multiples of " \
        f"{multiple}" if report["mlp_units_padded"] else ""
    print(f"compacted: {report['mlp_units_removed']} MLP units and {report['heads_removed']} "
          f"heads removed{padded}; {report['zero_columns_kept']} zero input columns and "
          f"{report['zeros_kept']} zero weights kept in place")
    n = record["params_dense"]
    print(f"parameters: dense {n / 1e6:.2f}M -> compact {report['params_after'] / 1e6:.2f}M "
          f"({report['params_after'] / n:.1%})")
    print(f"forward latency, batch {tuple(batch.shape)}: pruned {record['latency_ms_pruned']:.0f} "
          f"ms -> compact {record['latency_ms_compact']:.0f} ms "
          f"({record['latency_ms_pruned'] / record['latency_ms_compact']:.2f}x)")
    print(f"perplexity: pruned {record['ppl_pruned']:.3f} -> compact {record['ppl_compact']:.3f}")
    return report["shapes"]


# ----------------------------------------------------------------------------------------------
# Running as a command (command.py: error lines, signals, torchrun's exit)


def cli():
    """The installed `llm-surgeon` command: main, exit status 0 after a good run (main returns
    the record, which an entry point's sys.exit would print and take for a failure)."""
    main()
    return 0


def main(argv=None):
    """The command line; returns the run's record (under torchrun it exits instead)."""
    return command.main(run, argv)


if __name__ == "__main__":
    main()

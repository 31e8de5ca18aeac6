"""Prune an OPT or Llama-family model with The LLM Surgeon and measure its perplexity.

    python run_opt.py --model facebook/opt-125m --sparsity 0.3
    torchrun --nproc-per-node 4 run_opt.py ...          # several processes (GPUs), same weights

loads the model (float32 on CPU, the checkpoint's own dtype on CUDA), calibrates on WikiText-2
(128 random windows of 2048 tokens of the train split), prunes (rows and columns in shots of
1.25%, by default), and evaluates perplexity on the test split before and after, as SparseGPT
and the paper do. --model also takes a local folder and --train-file / --test-file local plain
text, so the same command runs without a hub.
"""
import argparse
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
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from contextlib import contextmanager
from dataclasses import asdict, fields

import torch

import compact as compaction
import surgeon

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
    "layers": "each pruned layer's fraction of zero weights",
    "shots": "each shot: shot, target, sparsity, seconds of each part, ppl where evaluated; "
             "--save-every: saved (the folder) and with --compact params_compact",
    "resumed": "--resume: from_shot, and prune_seconds_all_shots over the earlier runs too",
    "latency_ms_pruned": "--compact: forward latency of 8 test windows before compaction",
    "latency_ms_compact": "--compact: the same after compaction",
    "ppl_compact": "--compact: perplexity after compaction",
    "params_compact": "--compact: the model's parameters after compaction",
    "compact": "--compact: params_before/after, mlp_units_removed, mlp_units_padded, "
               "heads_removed, zeros_kept, zero_columns_kept",
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
    record.update(ppl_pruned=record["ppl_dense"], sparsity=record["sparsity_before"],
                  layers=surgeon.layer_sparsity(layers), shots=[])
    after = None
    if pruner.prunes:
        with stage(record, "prune", device):
            report = pruner.prune(model, layers, calib, test, device, record)
        with stage(record, "eval_pruned", device):
            last = report["shots"][-1] if report["shots"] else {}
            record["ppl_pruned"] = last["ppl"] if "ppl" in last else \
                perplexity(model, test, device, "eval pruned")     # evaluated after its last shot
        record.update(sparsity=report["sparsity"], layers=report["layers"], shots=report["shots"])
        print_pruned(record, layers)
    after = pruner.after(model, test, device, record)
    if args.save and main_rank():
        with stage(record, "save", device):
            pruner.save(model, tokenizer, args.save, after, record)
            mark_saved(args.save, record["settings"], record["ppl_pruned"])
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
    """LLM Surgeon (surgeon.prune) with run_opt's flags: checkpoints and resume, --eval-every,
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
        check_shapes(args, self.settings, calib)

    def check_model(self, model, layers, calib):
        try:
            surgeon.check(self.settings, layers, calib, units_of(self.args, model))
        except ValueError as err:
            fail(str(err))

    def prune(self, model, layers, calib, test, device, record):
        keep = None
        if self.saved_shots:                        # the tokenizer, read once for every copy
            tokenizer = load_tokenizer(self.args.model)[0]
            keep = functools.partial(self.save_shot, model, tokenizer, record=record)
        report = prune_stage(self.args, self.settings, model, layers, calib, test, device, keep)
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
# Arguments


DEFAULT = surgeon.Settings()          # the method's defaults are Settings'; the flags read them


class Help(argparse.HelpFormatter):
    """Every flag's help ends with its default, unless the help says it already."""
    def _get_help_string(self, action):
        shown = not any(action.default is x for x in (None, False, argparse.SUPPRESS))
        return action.help + (" (default: %(default)s)" if shown and "default" not in
                              action.help else "")


class Parser(argparse.ArgumentParser):
    def error(self, message):                       # one line, no usage block
        fail(message)


def _number(kind, ok, wanted):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {text}") from None
        if not (math.isfinite(value) and ok(value)):
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {text}")
        return value
    return parse


fraction = _number(float, lambda v: 0 <= v < 1, "in [0, 1)")
positive = _number(int, lambda v: v >= 1, "a positive integer")
count = _number(int, lambda v: v >= 0, "an integer >= 0")
nonnegative = _number(float, lambda v: v >= 0, "a finite number >= 0")
positive_float = _number(float, lambda v: v > 0, "a finite number > 0")


def structure(text):
    try:
        return surgeon.structure_of(text).name
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def parse_args(argv=None):
    p = Parser(description=__doc__.split("\n")[0],
               formatter_class=Help)
    p.add_argument("--model", default="facebook/opt-125m", help="hub id or local folder")
    p.add_argument("--sparsity", type=fraction, default=0.3,
                   help="fraction of the pruned layers' weights that end at zero, whatever made "
                        "them zero (weights already zero count); 0 only evaluates")
    p.add_argument("--structure", type=structure, default="rowcol",
                   help="what is removed: unstructured (single weights), N:M (N of every M "
                        "consecutive inputs of a row: 2:4, 4:8, ...), rowcol (whole rows and "
                        "columns) or units (attention heads and MLP units)")
    p.add_argument("--method", choices=surgeon.METHODS, default="surgeon",
                   help="LLM Surgeon, or a baseline (K-OBD, L-OBD, magnitude) from the same loop")
    p.add_argument("--shots", type=positive,
                   help="pruning shots (default: rowcol and units the paper's 1.25%% a shot, "
                        "ceil(sparsity / 0.0125): 24 at 0.3, 40 at 0.5; 5 otherwise)")
    p.add_argument("--nsamples", type=positive, default=128, help="calibration windows")
    p.add_argument("--seqlen", type=positive,
                   help="tokens per window (default min(2048, the model's context))")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration windows")
    p.add_argument("--train-file", help="local text for calibration (default: WikiText-2 train)")
    p.add_argument("--test-file", help="local text for evaluation (default: WikiText-2 test)")
    p.add_argument("--eval-windows", type=positive,
                   help="evaluate only the first N windows (default: all)")
    p.add_argument("--device", help="cuda or cpu (default: cuda when available, else cpu)")
    p.add_argument("--dtype", choices=DTYPES,
                   help="the weights' dtype: auto is the checkpoint's own (float16 or bfloat16 "
                        "for most); factors are float32 and updates float64 either way (default: "
                        "auto on CUDA; float32 on CPU, where 16-bit speed depends on the "
                        "processor: bfloat16 was faster on the one benchmarks/README.md used)")
    p.add_argument("--damp-a", type=nonnegative, default=DEFAULT.damp_a,
                   help="damping of A, relative to its mean diagonal")
    p.add_argument("--damp-g", type=nonnegative, default=DEFAULT.damp_g,
                   help="damping of G, relative (the paper's 0.01 for rowcol is measured in "
                        "benchmarks/README.md)")
    p.add_argument("--damp-costs", action=argparse.BooleanOptionalAction,
                   default=DEFAULT.damp_costs,
                   help="rowcol: damped A and G in the costs' quadratic forms too (default: "
                        "undamped there, as the authors' code; damped in the precisions and the "
                        "update either way)")
    p.add_argument("--max-correlate", type=positive, default=DEFAULT.max_correlate,
                   help="most removed weights solved together in an element update (1: one row "
                        "at a time; the authors' 2000 measured no better and 5.5x slower, README)")
    p.add_argument("--device-map", metavar="auto|FILE.json",
                   help="place the model across devices with accelerate: 'auto', or a JSON file "
                        "mapping module names to a GPU index, 'cpu' or 'disk'")
    p.add_argument("--curvature-device",
                   help="where the KFAC factors live (default: the model's device; cpu keeps "
                        "them in host memory)")
    p.add_argument("--eval-every", type=count, default=0, metavar="K",
                   help="perplexity after every K-th shot and the last (0: after the last only)")
    p.add_argument("--skip-dense-eval", action="store_true",
                   help="do not evaluate the dense model (a grid that measured it once)")
    p.add_argument("--compact", action="store_true",
                   help="after rowcol or units pruning, cut dead units and heads out; measure "
                        "the speed-up")
    p.add_argument("--compact-multiple", type=positive, default=1, metavar="N",
                   help="--compact: pad each MLP with zero units to a width that is a multiple "
                        "of N, which matrix kernels run faster (1: no padding)")
    p.add_argument("--unit-cost", choices=("cut", "lines"), default=DEFAULT.unit_cost,
                   help="units: a unit's cost is its cheapest cut's OBS cost, or the sum of its "
                        "lines' costs")
    p.add_argument("--lora-steps", type=count,
                   help="interleaved low-rank update steps after each shot (0: off; default 3 "
                   "for surgeon on rowcol and units, 0 otherwise)")
    p.add_argument("--lora-rank", type=positive, default=DEFAULT.lora_rank,
                   help="rank of the low-rank update")
    p.add_argument("--lora-lr", type=positive_float, default=DEFAULT.lora_lr,
                   help="Adam learning rate of it")
    p.add_argument("--checkpoint", metavar="DIR",
                   help="write the pruned weights and the run's state here after every shot")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --checkpoint DIR after its last complete shot")
    p.add_argument("--save", metavar="DIR", help="save the pruned model and tokenizer here")
    p.add_argument("--save-every", type=count, default=0, metavar="K",
                   help="with --save DIR: also save the model after every K-th shot, in "
                        "DIR-shot-K, compacted with --compact (holds a copy of the model while "
                        "it saves; 0: the last shot only)")
    p.add_argument("--json", metavar="PATH", help="write settings and results as JSON here")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------
# Checks: everything a user types is checked before the model loads


SAVED = "run_opt.json"              # marks a --save folder as this program's output
DTYPES = ("auto", "float32", "bfloat16", "float16")
CHECKPOINT = "checkpoint.pt"
RESULT_SETTINGS = ("model", "dtype", "nsamples", "seqlen", "seed", "train_file",  # what a
                   *(f.name for f in fields(surgeon.Settings)                 # resumed run must
                     if f.name != "curvature_device"))                        # share


def validate(args):
    """The device and settings, after checking everything that needs no model."""
    settings = surgeon.Settings(**{f.name: getattr(args, f.name) for f in fields(surgeon.Settings)})
    vars(args).update(asdict(settings))       # defaults resolved (shots, lora_steps), recorded
    try:
        surgeon.check(settings)
        device = surgeon.check_device(args.device or ("cuda" if torch.cuda.is_available()
                                                      else "cpu"))
    except ValueError as err:
        fail(str(err))
    args.dtype = args.dtype or ("auto" if device.type == "cuda" else "float32")
    if world_size() > 1:
        if args.device_map:
            fail("--device-map cannot be used with several processes (each rank holds the whole "
                 "model on its own device); use one process for a model that needs several "
                 "devices, or --curvature-device cpu to keep the factors in host memory")
        if device.type == "cuda":                    # rank r on cuda:LOCAL_RANK
            device = surgeon.check_device(f"cuda:{os.environ.get('LOCAL_RANK', '0')}")
    if local_path(args.model):
        model_folder(args.model)
    elif not hub_reachable():
        offline()                   # the cache only: a model not there fails at once, no retries
    for path in (args.train_file, args.test_file):
        if path:
            read_text(path)
    if args.device_map:
        args.device_map = device_map(args.device_map)
    if args.json:                     # rank 0 alone writes them; the others check, writing
        writable_file(args.json, "--json")      # nothing, so that they leave with rank 0
    if args.save:
        writable_folder(args.save, "--save", SAVED)
        if os.path.exists(os.path.join(args.save, SAVED)) and main_rank():
            print(f"--save {args.save}: replacing the model that an earlier run saved there")
    if args.save_every:
        if not args.save:
            fail("--save-every needs --save DIR (the folders are DIR-shot-K)")
        if args.device_map:
            fail("--save-every cannot be used with --device-map (it copies the model); save "
                 "the shots you want with --sparsity and --shots of their own instead")
        for k in saved_shots(args, settings):
            writable_folder(f"{args.save}-shot-{k}", "--save-every", SAVED)
    if args.resume and not args.checkpoint:
        fail("--resume needs --checkpoint DIR")
    if args.checkpoint:
        writable_folder(args.checkpoint, "--checkpoint", CHECKPOINT)
        there = os.path.exists(os.path.join(args.checkpoint, CHECKPOINT))
        if args.resume and not there:
            fail(f"--resume: no checkpoint in {args.checkpoint}")
        if args.resume:
            open_checkpoint(args.checkpoint, args, settings)
        if there and not args.resume:
            fail(f"{args.checkpoint} holds a checkpoint; pass --resume to continue that run, or "
                 "choose another folder")
    return device, settings


def saved_shots(args, settings):
    """The shots --save-every K saves besides the last: K, 2K, ..."""
    return range(args.save_every, settings.shots, args.save_every) if args.save_every else ()


def start_ranks(device):
    """Under torchrun (WORLD_SIZE > 1), after every input is checked: the process group, gloo on
    CPU, NCCL on CUDA. Each rank then owns a share of the layers (surgeon.Ranks)."""
    if world_size() > 1:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")


def writable_file(path, what):
    """Proved by writing: the file is created (and removed again if it was not there). Under
    torchrun, ranks other than 0 check its folder instead, writing nothing."""
    if os.path.isdir(path):
        fail(f"{what} {path} is a folder, not a file")
    if not main_rank():
        return writable_without_writing(os.path.dirname(os.path.abspath(path)), path, what)
    existed = os.path.exists(path)
    try:
        with open(path, "a"):
            pass
    except OSError as err:
        fail(f"{what} {path} cannot be written ({err.strerror})")
    if not existed:
        os.remove(path)


def writable_folder(path, what, mark):
    """A folder to create or fill: refused if it is a file or holds files that are not this
    program's (`mark`); proved by creating it and writing a file in it (both removed again)."""
    if os.path.exists(path) and not os.path.isdir(path):
        fail(f"{what} {path} is a file, not a folder")
    if os.path.isdir(path) and os.listdir(path) and not os.path.exists(os.path.join(path, mark)):
        fail(f"{what} {path} is not empty and not an output of run_opt.py; choose another folder")
    created = os.path.abspath(path)
    while not os.path.exists(os.path.dirname(created)) and os.path.dirname(created) != created:
        created = os.path.dirname(created)                 # the first folder that is made
    if not main_rank():
        return writable_without_writing(path if os.path.isdir(path) else os.path.dirname(created),
                                        path, what)
    created = None if os.path.exists(path) else created
    try:
        os.makedirs(path, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError as err:
        fail(f"{what} {path} cannot be written ({err.strerror})")
    finally:
        if created and os.path.isdir(created):
            shutil.rmtree(created, ignore_errors=True)


def writable_without_writing(folder, path, what):
    """What a rank other than 0 checks of an output path: its folder exists and may be written."""
    if not os.path.isdir(folder):
        fail(f"{what} {path} cannot be written (No such file or directory)")
    if not os.access(folder, os.W_OK):
        fail(f"{what} {path} cannot be written (Permission denied)")


def local_path(name):
    """True where --model names a folder rather than a hub id (org/name or name)."""
    return (os.path.exists(name) or name.startswith(("/", ".", "~")) or name.count("/") > 1
            or os.sep != "/" and os.sep in name)


def hub_reachable(timeout=3.0) -> bool:
    """Whether the model hub answers a connection within `timeout` seconds (through a proxy, or
    offline mode already set: assumed as set)."""
    from huggingface_hub import constants
    if constants.HF_HUB_OFFLINE or any(os.environ.get(v) for v in (
            "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urllib.parse.urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout).close()
        return True
    except OSError:
        return False


def offline():
    """Hugging Face's offline mode for this process: the local cache alone."""
    from huggingface_hub import constants
    os.environ["HF_HUB_OFFLINE"] = "1"
    constants.HF_HUB_OFFLINE = True


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json",
                   "vocab.txt", "spiece.model", "sentencepiece.bpe.model")


def model_folder(path):
    """A folder with what save_pretrained writes: config.json, weights and a tokenizer."""
    if not os.path.exists(os.path.expanduser(path)):
        fail(f"--model {path}: no such folder")
    if not os.path.isdir(os.path.expanduser(path)):
        fail(f"--model {path} is a file, not a folder; give the folder that holds the model's "
             "config.json, weights and tokenizer (what save_pretrained writes)")
    if compaction.is_compacted(path):
        return
    files = os.listdir(os.path.expanduser(path))
    missing = [what for what, there in (
        ("config.json", "config.json" in files),
        ("weights (model.safetensors or pytorch_model.bin)",
         any(f.endswith((".safetensors", ".bin")) for f in files)),
        ("tokenizer (tokenizer.json, tokenizer_config.json, ...)",
         any(f in TOKENIZER_FILES for f in files))) if not there]
    if missing:
        fail(f"--model {path} has no {' and no '.join(missing)}; a model folder holds what "
             "save_pretrained writes for the model and for its tokenizer")


def device_map(value):
    """'auto' or the mapping in a JSON file, checked; accelerate must be installed."""
    try:
        import accelerate  # noqa: F401  (from_pretrained dispatches through it)
    except ImportError:
        fail("--device-map needs accelerate: pip install accelerate")
    if value == "auto":
        return value
    try:
        mapping = json.loads(read_text(value))
    except json.JSONDecodeError as err:
        fail(f"--device-map {value} is not JSON ({err.msg}, line {err.lineno})")
    if not isinstance(mapping, dict) or not all(
            isinstance(v, int) or v in ("cpu", "disk") or str(v).startswith("cuda")
            for v in mapping.values()):
        fail(f"--device-map {value} must map module names to a GPU index, 'cpu' or 'disk'")
    for where in sorted({str(v) for v in mapping.values()} - {"cpu", "disk"}):
        gpu = f"cuda:{where}" if where.isdigit() else where
        try:
            surgeon.check_device(gpu)
        except ValueError:
            fail(f"--device-map {value} places modules on {gpu}, which is not available here "
                 f"(torch sees {torch.cuda.device_count()} GPU"
                 f"{'' if torch.cuda.device_count() == 1 else 's'})")
    return mapping


@functools.lru_cache(maxsize=2)             # read once: checked before loading, used after
def read_text(path):
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as err:
        fail(f"cannot read {path}: {err.strerror}")
    except UnicodeDecodeError as err:
        fail(f"cannot read {path}: not UTF-8 text (byte {err.start})")


# ----------------------------------------------------------------------------------------------
# The record: settings, provenance, seconds and peak memory of every stage


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
def stage(record, name, device):
    """Seconds and peak memory of one stage, into the record."""
    with surgeon.timed(record["seconds"], name):
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


@contextmanager
def compacted_quietly(name):
    """Without transformers' warning that a compacted folder's config names an unknown model
    type (its tokenizer is a plain one; the model loads with compact.load)."""
    from transformers.utils import logging
    before = logging.get_verbosity()
    if compaction.is_compacted(name):
        logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(before)


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
        fail(f"cannot load WikiText-2 ({one_line(err)}). Without a hub, pass local text with "
             "--train-file and --test-file")
    joined = (" " if split == "train" else "\n\n").join(data["text"])
    with working(f"tokenize WikiText-2 {split}"):
        return tokenizer(joined, return_tensors="pt").input_ids[0]


@contextmanager
def working(desc):
    """A progress line with the seconds so far, for a step that reports no progress itself
    (shown once it has taken a second)."""
    from tqdm import tqdm
    bar = tqdm(desc=desc, bar_format="{desc}: {elapsed}", leave=False, file=sys.stderr,
               disable=not main_rank(), delay=1)
    done = threading.Event()

    def tick():
        while not done.wait(0.5):
            bar.refresh()
    ticker = threading.Thread(target=tick, daemon=True)
    ticker.start()
    try:
        yield
    finally:
        done.set()
        ticker.join()
        bar.close()


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


@contextmanager
def loading(name):
    """Any failure to load (unknown id, no network, broken folder) as one line; for a folder,
    the file that is broken where one is."""
    try:
        yield
    except Failure:
        raise
    except Exception as err:
        first = one_line(err)
        if not local_path(name):
            fail(f"cannot load model {name!r} ({first}). Without a hub, pass a local folder with "
                 "--model /path/to/folder")
        fail(f"cannot load model {name}: {broken_file(name) or first}")


def broken_file(folder):
    """'PATH is broken or truncated (why)' for the first weights file of `folder` that does not
    read to its end, or None."""
    from safetensors import safe_open
    for file in sorted(os.listdir(folder)):
        path = os.path.join(folder, file)
        try:
            if file.endswith(".safetensors"):
                with safe_open(path, "pt") as f:
                    for key in f.keys():
                        f.get_slice(key)[-1:]          # the last row of each: reaches the end
            elif file.endswith(".bin"):
                torch.load(path, weights_only=True, mmap=True)
        except Exception as err:
            return f"{path} is broken or truncated ({one_line(err)})"
    return None


EXPERTS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


def check_shapes(args, settings, calib):
    """The model's layers built from its config alone (on the meta device: no weights, no
    memory), checked as `surgeon.check` checks the loaded ones: N:M widths, layers that are not
    nn.Linear (GPT-2's Conv1D), mixtures of experts; and said: weight matrices of the blocks
    that are not pruned, fused projections that --compact cannot cut. A 7B model is refused in a
    second, not after minutes of loading."""
    if args.sparsity == 0 or compaction.is_compacted(args.model):
        return
    from transformers import AutoConfig, AutoModelForCausalLM
    with loading(args.model):
        config = AutoConfig.from_pretrained(args.model)
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
    experts = [getattr(config, k) for k in EXPERTS if (getattr(config, k, None) or 0) > 1]
    if experts or any(re.search("moe|expert", type(m).__name__, re.I) for m in skeleton.modules()):
        fail(f"{args.model}: a mixture-of-experts model ({config.model_type}"
             f"{f', {experts[0]} experts' if experts else ''}) is not supported: its experts see "
             "only the tokens routed to them, which the curvature of one layer does not model, "
             "and its routers must not be pruned. Dense decoders are (OPT, Llama, Mistral, "
             "Qwen2, Phi3, Gemma, GPT-NeoX, ...)")
    layers = surgeon.prunable_layers(skeleton)
    if not layers:
        kinds = sorted({type(m).__name__ for m in skeleton.modules()
                        if not isinstance(m, (torch.nn.Embedding, torch.nn.Linear))
                        and getattr(m, "weight", None) is not None and m.weight.dim() == 2})
        fail(f"{args.model}: no prunable nn.Linear layers (its weight matrices sit in "
             f"{', '.join(kinds) or 'no layer'} modules; only nn.Linear is pruned)")
    try:
        surgeon.check(settings, layers, calib, units_of(args, skeleton))
    except ValueError as err:
        fail(str(err))
    unpruned(skeleton, layers)
    fused = compaction.uncuttable(skeleton) \
        if args.compact and args.structure in surgeon.LINES else []
    if fused:
        print(f"--compact: compaction finds no separate {' and no '.join(fused)} projections in "
              f"{args.model}'s blocks (fused layers such as qkv_proj or gate_up_proj), so it "
              "cuts nothing there; their zeros stay in place")


def unpruned(skeleton, layers):
    """Say which weight matrices of the blocks are not pruned (not nn.Linear), and how many."""
    pruned = {id(layer.weight) for layer in layers.values()}
    owners = {id(p): (type(m).__name__, p.numel())
              for block in skeleton.modules() if isinstance(block, torch.nn.ModuleList)
              for m in block.modules() for p in m.parameters(recurse=False) if p.dim() >= 2}
    left = {i: owner for i, owner in owners.items() if i not in pruned}
    if left:
        share = sum(n for _, n in left.values()) / sum(n for _, n in owners.values())
        kinds = ", ".join(sorted({kind for kind, _ in left.values()}))
        print(f"note: {share:.1%} of the weights in the blocks' matrices are not pruned (they sit "
              f"in {kinds}, not nn.Linear); sparsity is counted over the pruned layers alone")


def units_of(args, model):
    """The model's heads and MLP units, for --structure units (compact.py finds them)."""
    return compaction.units(model) if args.structure == "units" else None


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
        offloaded_access(model, offload)
        return model.eval()
    return model.to(device).eval()


def load(name, device="cpu", device_map=None, dtype="float32"):
    """(model, tokenizer) from a hub id or a folder, a compacted one too: what `run_opt.py
    --save` wrote loads with `model, tokenizer = run_opt.load(folder)`."""
    return load_model(name, device, device_map, dtype), load_tokenizer(name)[0]


def offloaded_access(model, folder):
    """Give every layer whose weights accelerate keeps off the device (in host memory or on
    disk, its parameters on 'meta' between calls) the read_weights/write_weights that surgeon
    uses. Writes go to host memory in place, or to a new file in `folder` for disk weights (a
    disk weight may be read from the model's own safetensors file, which stays untouched)."""
    from accelerate.utils import offload_weight
    for module in model.modules():
        hook = getattr(module, "_hf_hook", None)
        if not isinstance(module, torch.nn.Linear) or not getattr(hook, "offload", False):
            continue
        store, prefix = hook.weights_map.dataset, hook.weights_map.prefix

        def read(store=store, prefix=prefix, bias=module.bias is not None):
            return store[prefix + "weight"], store[prefix + "bias"] if bias else None

        def write(weight, bias, store=store, prefix=prefix):
            for key, value in ((prefix + "weight", weight), (prefix + "bias", bias)):
                if value is None:
                    continue
                in_memory = getattr(store, "state_dict", store)              # host memory
                if key in in_memory:
                    in_memory[key].copy_(value)
                else:                                                         # disk
                    store.save_folder = store.save_folder or folder
                    offload_weight(value.detach().cpu(), key, store.save_folder, store.index)
        module.read_weights, module.write_weights = read, write


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
    ranks = surgeon.processes({})
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
# Pruning, with a checkpoint after every shot: written to a temporary name, then renamed, so that
# a kill at any moment leaves the last complete one


def prune_stage(args, settings, model, layers, calib, test, device, keep=None):
    """surgeon.prune with progress, per-shot lines, checkpoints and resume; keep(shot) after each
    shot's evaluation (--save-every)."""
    from tqdm import tqdm
    first, shots = 1, []
    if args.resume:
        first, shots = read_checkpoint(args.checkpoint, args, settings, layers)
        print(f"resuming from {args.checkpoint} after shot {first - 1}")
    print(f"pruning {args.sparsity:.0%} {args.structure} with {args.method}, "
          f"{settings.shots} shot{'s' if settings.shots > 1 else ''}")

    def on_shot(shot):
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
        tqdm.write(f"shot {shot['shot']}/{settings.shots}: sparsity {shot['sparsity']:.4f}  "
                   + "  ".join(f"{k} {v:.1f}s" for k, v in shot["seconds"].items())
                   + (f"  ppl {shot['ppl']:.2f}" if "ppl" in shot else ""))

    progress = lambda it, desc: tqdm(it, desc=desc, leave=False, file=sys.stderr,  # noqa: E731
                                     disable=not main_rank())
    try:
        report = surgeon.prune(model, calib, settings, on_shot=on_shot, progress=progress,
                               units=units_of(args, model),
                               first_shot=first)
    except ValueError as err:
        fail(f"{err} {' '.join(getattr(err, '__notes__', []))}".strip())
    except KeyboardInterrupt as err:
        raise Interrupted(
            f"the last checkpoint is in {args.checkpoint} (after shot {shots[-1]['shot']}); "
            "run the same command with --resume to go on" if args.checkpoint and shots else
            "no checkpoint was written (--checkpoint DIR keeps one after every shot)",
            terminated=isinstance(err, Terminated)) from None
    return {**report, "shots": shots, "first_shot": first}


def mark_saved(folder, settings, ppl, **shot):
    """SAVED in the folder: the run's settings, the perplexity, and of a --save-every folder the
    shot and sparsity it holds."""
    with open(os.path.join(folder, SAVED), "w") as f:
        json.dump({"settings": settings, "ppl_pruned": ppl, **shot}, f)
    print(f"saved to {folder}")


def result_settings(args, settings):
    return {k: getattr(settings, k) if hasattr(settings, k) else getattr(args, k)
            for k in RESULT_SETTINGS}


def write_checkpoint(folder, args, settings, layers, shots):
    state = {"settings": result_settings(args, settings),
             "next_shot": shots[-1]["shot"] + 1, "shots": shots,
             "weights": {name: surgeon.get_matrix(layer).float().cpu()
                         for name, layer in layers.items()}}                # W~ = [W | b]
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, CHECKPOINT)
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)


def open_checkpoint(folder, args, settings):
    """The checkpoint's state (weights mapped from disk, not read), if its settings are these."""
    path = os.path.join(folder, CHECKPOINT)
    try:
        state = torch.load(path, weights_only=True, mmap=True)
        then = {"dtype": "float32", "unit_cost": "cut", **state["settings"]}   # before those
        state["next_shot"], state["shots"], state["weights"]
    except Exception as err:
        fail(f"--resume: {path} is damaged or partial ({one_line(err)}); the run cannot go on "
             "from it (it is left as it is)")
    now = result_settings(args, settings)
    differ = [f"{k} ({then.get(k)!r} there, {now[k]!r} now)"
              for k in RESULT_SETTINGS if then.get(k) != now[k]]
    if differ:
        fail(f"--resume: the checkpoint in {folder} was made with other settings: "
             + ", ".join(differ))
    return state


def read_checkpoint(folder, args, settings, layers):
    """Loads the weights into `layers`; returns (next shot, shot records so far)."""
    state = open_checkpoint(folder, args, settings)
    for name, layer in layers.items():
        surgeon.set_matrix(layer, state["weights"][name])
    return state["next_shot"], state["shots"]


# ----------------------------------------------------------------------------------------------
# Reporting and saving


def print_pruned(record, layers):
    total = sum(layer.weight.numel() for layer in layers.values())
    if record["layers"]:
        print("sparsity per layer (percent zero):\n" + sparsity_table(record["layers"]))
    print(f"sparsity: {record['sparsity']:.4f} of the pruned layers' {total / 1e6:.1f}M weights")
    dense = "not evaluated" if record["ppl_dense"] is None else f"{record['ppl_dense']:.2f}"
    print(f"perplexity: dense {dense} -> pruned {record['ppl_pruned']:.2f}")


def sparsity_table(layers: dict[str, float]) -> str:
    """Blocks as rows, layer kinds (q_proj, fc1, ...) as columns, percent zero."""
    grid, kinds = {}, []
    for name, value in layers.items():
        block = re.search(r"\.(\d+)\.", name)
        kind = name.split(".")[-1]
        kinds += [kind] if kind not in kinds else []
        grid.setdefault(block.group(1) if block else "-", {})[kind] = value
    width = [max(8, len(k)) for k in kinds]
    lines = ["block " + " ".join(f"{k:>{w}}" for k, w in zip(kinds, width))]
    for block, row in grid.items():
        lines.append(f"{block:>5} " + " ".join(
            f"{100 * row[k]:{w - 1}.1f}%" if k in row else " " * w for k, w in zip(kinds, width)))
    return "\n".join(lines)


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
# Running as a command: one `error:` line for a bad input (exit 2), one line for Ctrl-C and
# SIGTERM (exit 130, 143), and under torchrun rank 0 alone speaks


def cli():
    """The installed `llm-surgeon` command: main, exit status 0 after a good run (main returns
    the record, which an entry point's sys.exit would print and take for a failure)."""
    main()
    return 0


def main(argv=None):
    """The command line; returns the run's record (under torchrun it exits instead)."""
    if world_size() == 1:
        return command_line(run, argv)
    try:                          # under torchrun: the ranks met at a barrier when done; leave
        command_line(run, argv)   # without the interpreter's teardown, where gloo's threads can
        code = 0                  # abort a finished rank ("terminate called without an active
    except SystemExit as exit:    # exception")
        code = exit.code if isinstance(exit.code, int) else 1
    sys.stdout.flush()
    sys.stderr.flush()
    if code and not main_rank():  # torchrun stops every rank when one exits: rank 0, which
        time.sleep(2)             # failed alike, says why first
    os._exit(code)


def command_line(run, argv=None):
    """run(argv), with errors as one `error:` line (exit 2), and Ctrl-C and SIGTERM (what batch
    schedulers send at a time limit) as one line (exit 130 and 143)."""
    before, stdout = signal.signal(signal.SIGTERM, terminate), sys.stdout
    if not main_rank():                        # under torchrun, rank 0 alone speaks
        sys.stdout = open(os.devnull, "w")
    try:
        return run(argv)
    except Failure as err:
        if main_rank():
            print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except (Interrupted, KeyboardInterrupt) as err:
        what = "terminated" if isinstance(err, Terminated) or getattr(err, "terminated", False) \
            else "interrupted"
        if main_rank():
            print(f"{what}{': ' if str(err) else ''}{err}", file=sys.stderr)
        sys.exit(143 if what == "terminated" else 130)
    finally:
        signal.signal(signal.SIGTERM, before)
        if sys.stdout is not stdout:
            sys.stdout.close()
            sys.stdout = stdout


def main_rank():
    """Whether this process is rank 0 of a torchrun launch (or the only process)."""
    return os.environ.get("RANK", "0") == "0"


def world_size():
    return int(os.environ.get("WORLD_SIZE", "1"))


class Terminated(KeyboardInterrupt):
    """SIGTERM, treated as Ctrl-C is."""


def terminate(signum, frame):
    raise Terminated()


class Failure(Exception):
    """An input that cannot work; `main` prints it as one `error:` line and exits with 2."""


class Interrupted(Exception):
    """Ctrl-C or SIGTERM; `main` prints where the run stood and exits with 130 or 143."""
    def __init__(self, message, terminated=False):
        super().__init__(message)
        self.terminated = terminated


def fail(message):
    raise Failure(message)


def one_line(err, limit=300) -> str:
    """An exception's whole message as one line (at most `limit` characters)."""
    text = " ".join(str(err).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


if __name__ == "__main__":
    main()

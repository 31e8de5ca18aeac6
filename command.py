"""The command line around run_opt.py's protocol: its arguments, the checks of everything a
user types before anything loads (paths, devices, text, the hub, the model's layers from its
config alone), the error lines, Ctrl-C, SIGTERM and torchrun's exit, and checkpoints.

A bad input is one `error:` line (exit 2) and writes nothing; Ctrl-C and SIGTERM print one line
(exit 130, 143); under torchrun rank 0 alone speaks.
"""
import argparse
import functools
import json
import math
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import urllib.parse
from contextlib import contextmanager
from dataclasses import asdict, fields

import torch

import compact as compaction
import gguf_export
import scale
import surgeon
import units
import zeroshot


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
        return text if text == "units" else surgeon.structure_of(text).name
    except ValueError:
        raise argparse.ArgumentTypeError(f"structure must be unstructured, rowcol, units or N:M "
                                         f"with 0 < N < M, got {text!r}") from None


def task_list(text):
    tasks = [t.strip() for t in text.split(",") if t.strip()]
    if not tasks:
        raise argparse.ArgumentTypeError("name one lm-eval task or more, comma-separated")
    return tasks


def parse_args(argv=None):
    p = Parser(description="Prune an OPT or Llama-family model with The LLM Surgeon and measure "
                           "its perplexity.",
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
    p.add_argument("--unit-cost", choices=("cut", "lines"), default="cut",
                   help="units: a unit's cost is its cheapest cut's OBS cost, or the sum of its "
                        "lines' costs")
    p.add_argument("--unit-order", choices=units.ORDERS, default="per-weight",
                   help="units: units are taken in order of their cost per weight removed, or "
                        "of their cost (benchmarks/README.md measures both)")
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
    p.add_argument("--gguf", metavar="FILE",
                   help="also write the pruned model (compacted with --compact) as one GGUF "
                        "file that llama.cpp runs (Llama-family models)")
    p.add_argument("--gguf-type", choices=gguf_export.TYPES, default="f32",
                   help="--gguf: the weight matrices' type in the file")
    p.add_argument("--tasks", type=task_list, metavar="T1,T2,...",
                   help="zero-shot accuracy of the dense and the pruned model on these "
                        "lm-evaluation-harness tasks (the peers report "
                        f"{','.join(zeroshot.PEERS)}; needs pip install lm-eval)")
    p.add_argument("--task-dir", metavar="DIR",
                   help="--tasks: task definitions of your own in this folder (lm-eval's "
                        "include path)")
    p.add_argument("--json", metavar="PATH", help="write settings and results as JSON here")
    args = p.parse_args(argv)
    for action in p._actions:                   # parsed again without defaults: what was typed
        action.default = argparse.SUPPRESS
    args.given = set(vars(p.parse_args(argv)))
    return args


# ----------------------------------------------------------------------------------------------
# Checks: everything a user types is checked before the model loads


SAVED = "run_opt.json"              # marks a --save folder as this program's output
DTYPES = ("auto", "float32", "bfloat16", "float16")
CHECKPOINT = "checkpoint.pt"
RESULT_SETTINGS = ("model", "dtype", "nsamples", "seqlen", "seed", "train_file",  # what a
                   *(f.name for f in fields(surgeon.Settings)                 # resumed run must
                     if f.name != "curvature_device"), "unit_cost", "unit_order")   # share


def validate(args):
    """The device and settings, after checking everything that needs no model."""
    settings = surgeon.Settings(**{f.name: getattr(args, f.name) for f in fields(surgeon.Settings)})
    vars(args).update(asdict(settings))       # defaults resolved (shots, lora_steps), recorded
    unused_flags(args, vars(args).pop("given", set()))
    try:
        scale.check(settings)
        device = scale.check_device(args.device or ("cuda" if torch.cuda.is_available()
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
            device = scale.check_device(f"cuda:{os.environ.get('LOCAL_RANK', '0')}")
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
    if args.gguf:
        writable_file(args.gguf, "--gguf")
        with loading(args.model):
            from transformers import AutoConfig
            reason = gguf_export.check(AutoConfig.from_pretrained(
                args.model, trust_remote_code=compaction.is_compacted(args.model)))
        if reason:
            fail(f"{args.model}: {reason}")
    if args.tasks:
        if not hub_reachable():
            offline()               # the tasks' data from the datasets cache alone
        reason = zeroshot.check(args.tasks, args.task_dir)
        if reason:
            fail(reason)
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


def unused_flags(args, given):
    """An error for a flag typed that the chosen structure, method or mode does not use."""
    method, structure = f"--method {args.method}", f"--structure {args.structure}"
    baselines = "--method surgeon (the baselines use the undamped curvature)"
    rules = [(("unit_cost", "unit_order"), args.structure != "units", structure,
              "--structure units"),
             (("damp_costs",), args.structure not in surgeon.LINES, structure,
              "--structure rowcol or units"),
             (("max_correlate",), args.structure in surgeon.LINES, structure,
              "the element updates of unstructured and N:M"),
             (("max_correlate",), args.method != "surgeon", method, "--method surgeon's updates"),
             (("damp_a", "damp_g"), args.method != "surgeon", method, baselines),
             (("lora_rank", "lora_lr"), args.lora_steps == 0, "--lora-steps 0", "low-rank steps"),
             (("curvature_device",), args.method == "magnitude", method, "a method with curvature"),
             (("compact_multiple",), not args.compact, "no --compact", "--compact"),
             (("gguf_type",), not args.gguf, "no --gguf", "--gguf FILE"),
             (("task_dir",), not args.tasks, "no --tasks", "--tasks")]
    for dests, unused, here, needs in rules:
        for dest in dests:
            if dest in given and unused:
                fail(f"--{dest.replace('_', '-')} does nothing with {here}: it is for {needs}")


def saved_shots(args, settings):
    """The shots --save-every K saves besides the last: K, 2K, ..."""
    return range(args.save_every, settings.shots, args.save_every) if args.save_every else ()


def start_ranks(device):
    """Under torchrun (WORLD_SIZE > 1), after every input is checked: the process group, gloo on
    CPU, NCCL on CUDA. Each rank then owns a share of the layers (scale.Ranks)."""
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
    import datasets
    from huggingface_hub import constants
    os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"
    constants.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = True


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
            scale.check_device(gpu)
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


# ----------------------------------------------------------------------------------------------
# The model's layers, checked from its config alone


FUSED = {"attention": "q, k and v (qkv_proj, query_key_value)", "MLP": "gate and up (gate_up_proj)"}
EXPERTS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


def check_shapes(args, settings, calib):
    """The model's layers built from its config alone (on the meta device: no weights, no
    memory), checked as `scale.check` checks the loaded ones: N:M widths, layers that are not
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
    fused = compaction.uncuttable(skeleton) if args.structure in surgeon.LINES else []
    if fused and args.structure == "units":
        fail(f"{args.model}: --structure units needs separate projections, and the blocks of this "
             f"{config.model_type} model fuse their {' and their '.join(FUSED[k] for k in fused)}"
             f" in one layer; prune it with --structure rowcol (or unstructured, N:M) instead")
    try:
        scale.check(settings, layers, calib, pruned_structure(args, skeleton))
    except ValueError as err:
        fail(str(err))
    unpruned(skeleton, layers)
    if fused and args.compact:
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


def pruned_structure(args, model):
    """--structure units: the model's heads and MLP units (units.py); else None, the structure
    of the settings."""
    return units.structure(model, args.unit_cost, args.unit_order) \
        if args.structure == "units" else None


# ----------------------------------------------------------------------------------------------
# Progress of a step that reports none itself


@contextmanager
def working(desc):
    """The seconds of a step that reports no progress itself, once it has taken a second: on a
    terminal a line that ticks; elsewhere (a log) one line when the step ends."""
    from tqdm import tqdm
    if not sys.stderr.isatty():
        tic = time.perf_counter()
        yield
        if time.perf_counter() - tic >= 1 and main_rank():
            print(f"{desc}: {tqdm.format_interval(time.perf_counter() - tic)}", file=sys.stderr)
        return
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


# ----------------------------------------------------------------------------------------------
# Saved folders, and the pruned model kept whatever fails after the pruning


def mark_saved(folder, settings, ppl, **shot):
    """SAVED in the folder: the run's settings, the perplexity, and of a --save-every folder the
    shot and sparsity it holds."""
    with open(os.path.join(folder, SAVED), "w") as f:
        json.dump({"settings": settings, "ppl_pruned": ppl, **shot}, f)
    print(f"saved to {folder}")


@contextmanager
def pruning_kept(model, tokenizer, folder, record, pruned):
    """A failure after the pruning (evaluation, compaction, saving) does not lose the pruned
    model: it is saved as it is, in `folder` (--save) or else in a new temporary folder, before
    one error line says what failed and where the model is (exit 1)."""
    try:
        yield
    except Exception as err:
        if not pruned or not main_rank():
            raise
        what = f"after the pruning, {type(err).__name__}: {one_line(err)}"
        for where in (folder, None):
            try:
                where = where or tempfile.mkdtemp(prefix="llm-surgeon-pruned-")
                compaction.save(model, tokenizer, where, compaction.shapes(model))
                mark_saved(where, record["settings"], record["ppl_pruned"])
            except Exception:
                continue
            raise Failure(f"{what}. The pruned model is saved in {where} (it loads with "
                          f"--model {where}, or run_opt.load)", code=1) from err
        raise


# ----------------------------------------------------------------------------------------------
# Checkpoints: written to a temporary name, then renamed, so that a kill at any moment leaves the
# last complete one


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
        then = {"dtype": "float32", "unit_cost": "cut", "unit_order": "cost",    # before those
                **state["settings"]}
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
# Running as a command: one `error:` line for a bad input (exit 2), one line for Ctrl-C and
# SIGTERM (exit 130, 143), and under torchrun rank 0 alone speaks


def main(run, argv=None):
    """command_line(run, argv): returns the run's record; under torchrun it exits instead."""
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
        sys.exit(err.code)
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
    """An input that cannot work (or a run that failed): `main` prints it as one `error:` line
    and exits with `code`, 2 for an input."""

    def __init__(self, message, code=2):
        super().__init__(message)
        self.code = code


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

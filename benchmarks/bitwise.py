"""The same results bit for bit: run_opt.py of an earlier commit and of this checkout, on the
same tiny random OPT and Llama models and text, compared by what they save.

    python benchmarks/bitwise.py ae743e5            # exit 0 when every case is identical

Cases: both models; unstructured, 2:4, 4:8, rows and columns, heads and MLP units (the last two
with their low-rank steps);
each of the four methods; bfloat16 weights; 2 processes (torchrun, gloo); and the peers' own
command lines (SparseGPT, Wanda, SliceGPT; their records only). The saved tensors must be equal
bit for bit, and the records' perplexities and sparsities equal to every digit. The earlier commit is taken from git (`git archive`) into a temporary
folder; nothing is downloaded.
"""
import argparse
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

STRUCTURES = [("unstructured", "0.5"), ("2:4", "0.5"), ("4:8", "0.4"), ("rowcol", "0.3"),
              ("units", "0.3")]
METHODS = ("surgeon", "kobd", "lobd", "magnitude")
CASES = {f"{model}-{structure}-{method}": (model, ["--structure", structure, "--sparsity", sparsity,
                                                   "--method", method])
         for model, (structure, sparsity), method in itertools.product(
             ("opt", "llama"), STRUCTURES, METHODS)}
CASES.update({f"{model}-{structure}-bfloat16": (model, ["--structure", structure, "--sparsity",
                                                        sparsity, "--dtype", "bfloat16"])
              for model, (structure, sparsity) in (("llama", STRUCTURES[3]),
                                                   ("opt", STRUCTURES[1]))})
PEERS = {"llama-sparsegpt-2:4": ("sparsegpt_wanda", ["--method", "sparsegpt", "--structure", "2:4"]),
         "llama-wanda-unstructured": ("sparsegpt_wanda", ["--method", "wanda", "--structure",
                                                          "unstructured"]),
         "llama-slicegpt-30": ("slicegpt", ["--remove", "0.3"])}
SCRIPTS = {"sparsegpt_wanda": ("benchmarks/peers/sparsegpt_wanda.py", "benchmarks/peers.py"),
           "slicegpt": ("benchmarks/peers/slicegpt.py", "benchmarks/slicegpt.py")}  # now, before
RANKS = {f"{model}-{structure}-2-ranks": (model, ["--structure", structure, "--sparsity", sparsity])
         for model, (structure, sparsity) in (("llama", STRUCTURES[3]), ("opt", STRUCTURES[0]),
                                              ("llama", STRUCTURES[4]))}

# one process runs every single-process case of a tree (transformers is imported once)
DRIVER = """
import json, sys, torch
sys.path.insert(0, sys.argv[1])
torch.set_num_threads(1)
import run_opt
for argv in json.loads(sys.argv[2]):
    run_opt.main(argv)
"""


def data(files, model):
    return ["--model", os.path.join(files, model), "--train-file", os.path.join(files, "train.txt"),
            "--test-file", os.path.join(files, "test.txt"), "--nsamples", "4", "--seqlen", "32",
            "--eval-windows", "4", "--device", "cpu"]


def command(files, model, extra, out):
    return [*data(files, model), "--shots", "2", "--eval-every", "1", "--save",
            os.path.join(out, "model"), "--json", os.path.join(out, "record.json"), *extra]


def run_tree(tree, files, out):
    """Every case with the run_opt.py in `tree`; their outputs under out/NAME, what they print
    in out/log.txt."""
    for name in (*CASES, *PEERS, *RANKS):
        os.makedirs(os.path.join(out, name), exist_ok=True)
    argvs = [command(files, model, extra, os.path.join(out, name))
             for name, (model, extra) in CASES.items()]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(os.path.join(out, "log.txt"), "w") as log:
        subprocess.run([sys.executable, "-c", DRIVER, tree, json.dumps(argvs)], check=True,
                       env=env, stdout=log, stderr=log)
        for name, (script, extra) in PEERS.items():         # the peers' own command lines
            path = next(p for p in SCRIPTS[script] if os.path.exists(os.path.join(tree, p)))
            out_dir = os.path.join(out, name)
            subprocess.run([sys.executable, path, *data(files, "llama"),
                            "--json", os.path.join(out_dir, "record.json"), *extra],
                           cwd=tree, check=True, env=env, stdout=log, stderr=log)
        for name, (model, extra) in RANKS.items():
            subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                            "run_opt.py", *command(files, model, extra, os.path.join(out, name))],
                           cwd=tree, check=True, env=env, stdout=log, stderr=log)


def results(folder):
    """(saved tensors, or {} where the case saves none, and the record's numbers)."""
    from safetensors.torch import load_file
    with open(os.path.join(folder, "record.json")) as f:
        record = json.load(f)
    numbers = {k: record[k] for k in ("ppl_dense", "ppl_pruned", "sparsity")}
    numbers["shots"] = [(s["sparsity"], s.get("ppl")) for s in record["shots"]]
    saved = os.path.join(folder, "model", "model.safetensors")
    return (load_file(saved) if os.path.exists(saved) else {}), numbers


def compare(a, b):
    """('' where the two case folders hold the same results bit for bit, else what differs; the
    largest difference of a saved tensor relative to its largest weight; the same zeros)."""
    (wa, na), (wb, nb) = results(a), results(b)
    if wa.keys() != wb.keys():
        return "other tensors saved", float("inf"), False
    differ = [k for k in wa if not (wa[k].dtype == wb[k].dtype and wa[k].shape == wb[k].shape
                                    and (wa[k].view(-1).view(dtype_bits(wa[k]))
                                         == wb[k].view(-1).view(dtype_bits(wb[k]))).all())]
    if differ:
        worst = max(float((wa[k].double() - wb[k].double()).abs().max()
                          / wa[k].double().abs().max().clamp_min(1e-30)) for k in differ)
        zeros = all(((wa[k] == 0) == (wb[k] == 0)).all() for k in differ)
        return (f"{len(differ)} tensors differ, e.g. {differ[0]}; by at most {worst:.1e} of a "
                f"tensor's largest weight, {'the same' if zeros else 'other'} zeros"), worst, zeros
    return ("", 0.0, True) if na == nb else (f"numbers differ: {na} vs {nb}", float("inf"), True)


def dtype_bits(t):
    import torch
    return {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("ref", help="the earlier commit (default: ae743e5)", nargs="?", default="ae743e5")
    p.add_argument("--keep", help="keep the outputs in this folder")
    p.add_argument("--tolerance", type=float, default=0.0,
                   help="a case whose tensors differ by at most this much of their largest "
                        "weight, with the same zeros, counts as the same to this tolerance")
    args = p.parse_args(argv)
    sys.path.insert(0, ROOT)
    from conftest import make_files
    from pathlib import Path
    work = args.keep or tempfile.mkdtemp(prefix="bitwise-")
    files, before = os.path.join(work, "files"), os.path.join(work, "before")
    make_files(Path(files))
    os.makedirs(before, exist_ok=True)
    archive = subprocess.run(["git", "archive", args.ref], cwd=ROOT, check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", before], input=archive, check=True)
    after = os.path.join(work, "after")          # a copy: edits while it runs do not count
    shutil.copytree(ROOT, after, ignore=shutil.ignore_patterns(".git", "assets", "__pycache__"),
                    dirs_exist_ok=True)
    print(f"{len(CASES) + len(PEERS) + len(RANKS)} cases, {args.ref} in {before} against a copy of {ROOT}")
    for tree, out in ((before, "out-before"), (after, "out-after")):
        try:
            run_tree(tree, files, os.path.join(work, out))
        except subprocess.CalledProcessError as err:
            sys.exit(f"the runs of {tree} failed (exit {err.returncode}); see "
                     f"{os.path.join(work, out, 'log.txt')}")
    failed = close = 0
    for name in (*CASES, *PEERS, *RANKS):
        why, worst, zeros = compare(os.path.join(work, "out-before", name),
                                    os.path.join(work, "out-after", name))
        near = bool(why) and zeros and worst <= args.tolerance
        failed, close = failed + (bool(why) and not near), close + near
        said = "within tolerance: " if near else "DIFFERENT: "
        print(f"{name:32s} {'same bit for bit' if not why else said + why}")
    print(f"{len(CASES) + len(PEERS) + len(RANKS) - failed - close} same, "
          + (f"{close} within {args.tolerance:g}, " if args.tolerance else "")
          + f"{failed} different")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

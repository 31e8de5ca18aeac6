"""Peers measured here, written from their papers: SparseGPT and Wanda.

    python benchmarks/peers/sparsegpt_wanda.py --method sparsegpt --structure unstructured --sparsity 0.5 \\
        --model DIR --train-file TRAIN --test-file TEST --json OUT.json
    python benchmarks/peers/sparsegpt_wanda.py --method wanda --structure 2:4 ...

SparseGPT (Frantar and Alistarh, "SparseGPT: Massive Language Models Can Be Accurately Pruned
in One-Shot", ICML 2023, Algorithm 1) and Wanda (Sun, Liu, Bair and Kolter, "A Simple and
Effective Pruning Approach for Large Language Models", ICLR 2024) both prune block by block:
the calibration windows go through the decoder blocks one at a time, each block's linear layers
are pruned from the inputs that reach it through the blocks already pruned, and the pruned
block's outputs feed the next one. Neither removes whole rows or columns.

The model, the calibration windows, the evaluation windows and the perplexity are run_opt.py's
(imported, not copied), and the JSON record has the grid's form, so that benchmarks/grid.py's
tables read it. Seconds: "calibration" (the forward passes through the blocks and the statistics
they collect) and "updates" (the masks and weight updates).
"""
import argparse
import os
import sys

import torch
import torch.nn as nn

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)                 # run as a script: the repository's modules
import command  # noqa: E402
import run_opt  # noqa: E402
import scale  # noqa: E402
import surgeon  # noqa: E402

METHODS = ("sparsegpt", "wanda")


# ----------------------------------------------------------------------------------------------
# SparseGPT (Algorithm 1). H = 2 X X^T of a layer's inputs, damped by `damp` times its mean
# diagonal; U the upper Cholesky factor of H^-1 (H^-1 = U^T U). Columns are visited left to
# right in blocks of `block`; the mask of a block is chosen when the block starts (unstructured:
# the smallest w^2 / U_jj^2 within the block; N:M: the N smallest of every M columns), and each
# column's error is spread over the columns to its right through the row U[j, j:]: the OBS update
# of one weight with the inverse Hessian of the columns not visited yet.


def sparsegpt(W, H, sparsity=0.0, n=0, m=0, block=128, damp=0.01, mask=None):
    """The pruned W (rows, cols) in float64. With `mask` (bool, True = remove) the mask is given
    instead of chosen. H is the (cols, cols) Hessian of the layer's inputs."""
    W, H = W.double().clone(), H.double().clone()
    dead = H.diagonal() == 0                         # inputs that are always zero
    H[dead, dead] = 1
    W[:, dead] = 0
    H.diagonal().add_(damp * H.diagonal().mean())
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    rows, cols = W.shape
    removed = torch.zeros_like(W, dtype=torch.bool)
    for b0 in range(0, cols, block):
        b1 = min(b0 + block, cols)
        W1, U1 = W[:, b0:b1].clone(), U[b0:b1, b0:b1]
        Err = torch.zeros_like(W1)
        if mask is not None:
            M1 = mask[:, b0:b1].clone()
        elif n:
            M1 = torch.zeros_like(W1, dtype=torch.bool)
        else:                                        # the block's k smallest w^2 / U_jj^2
            score = (W1**2 / U1.diagonal()**2).flatten()
            drop = score.topk(int(score.numel() * sparsity), largest=False).indices
            M1 = torch.zeros_like(score, dtype=torch.bool).scatter_(0, drop, True).view(W1.shape)
        for j in range(b1 - b0):
            if n and mask is None and j % m == 0:        # N:M: the group's N cheapest weights
                score = W1[:, j:j + m]**2 / U1.diagonal()[j:j + m]**2
                M1.scatter_(1, j + score.topk(n, dim=1, largest=False).indices, True)
            w = W1[:, j]
            err = torch.where(M1[:, j], w, 0.0) / U1[j, j]            # (rows,)
            W1[:, j:] -= err[:, None] * U1[j, j:][None, :]            # OBS update, Eq. 3 of
            W1[:, j][M1[:, j]] = 0                                    # the paper, row by row
            Err[:, j] = err
        W[:, b0:b1] = W1
        W[:, b1:] -= Err @ U[b0:b1, b1:]                              # the block's lazy update
        removed[:, b0:b1] = M1
    W[removed] = 0
    return W


# ----------------------------------------------------------------------------------------------
# Wanda: score |W_ij| * ||X_j||_2 over the calibration tokens, compared within each output row
# (unstructured) or within each group of M consecutive inputs of a row (N:M). No update.


def wanda_mask(W, x_norm, sparsity=0.0, n=0, m=0):
    """bool (rows, cols), True = remove."""
    score = W.abs() * x_norm[None, :]
    rows, cols = W.shape
    if n:
        groups = score.reshape(rows, cols // m, m)
        drop = groups.topk(n, dim=-1, largest=False).indices
        return torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, drop, True).reshape(rows, cols)
    k = int(cols * sparsity)
    drop = score.sort(dim=1, stable=True).indices[:, :k]
    return torch.zeros_like(score, dtype=torch.bool).scatter_(1, drop, True)


# ----------------------------------------------------------------------------------------------
# Block by block through the model


class _Stop(Exception):
    pass


def decoder_blocks(model) -> nn.ModuleList:
    """The transformer blocks: the first nn.ModuleList of modules that hold nn.Linear layers."""
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and any(
                isinstance(sub, nn.Linear) for sub in module[0].modules()):
            return module
    raise ValueError("no decoder blocks (an nn.ModuleList of modules with nn.Linear) found")


@torch.no_grad()
def block_inputs(model, blocks, windows):
    """[(args, kwargs)] of the first block's call for every window."""
    calls = []

    def catch(module, args, kwargs):
        calls.append((args, kwargs))
        raise _Stop

    handle = blocks[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for ids in windows:
            try:
                model(ids, use_cache=False)    # a cache in the kwargs would grow with each call
            except _Stop:
                pass
    finally:
        handle.remove()
    return calls


def statistics(method, width, device):
    """What each layer collects of its inputs x (tokens, width): SparseGPT H = 2 X^T X / tokens,
    Wanda the sum of squares of every input."""
    zero = torch.zeros((width, width) if method == "sparsegpt" else width, dtype=torch.float64,
                       device=device)
    state = {"sum": zero, "tokens": 0}

    def add(x):                                      # float32 products, float64 sums
        x = x.reshape(-1, width).float()
        state["sum"] += (x.T @ x if method == "sparsegpt" else x.square().sum(0)).double()
        state["tokens"] += len(x)

    def result():
        if method == "sparsegpt":
            return 2 * state["sum"] / state["tokens"]
        return state["sum"].sqrt()

    return add, result


def prune_layer(layer, stat, method, sparsity, n, m):
    W = layer.weight.data
    if method == "sparsegpt":
        new = sparsegpt(W, stat, sparsity, n, m)
    else:
        new = W.masked_fill(wanda_mask(W.double(), stat, sparsity, n, m), 0)
    layer.weight.data.copy_(new.to(W.dtype))


@torch.no_grad()
def prune(model, windows, method, sparsity=0.0, n=0, m=0, progress=None):
    """Prune every linear layer of every block in place; returns seconds of "calibration" and
    "updates"."""
    blocks = decoder_blocks(model)
    seconds = {}
    with run_opt.timed(seconds, "calibration"):
        calls = block_inputs(model, blocks, windows)
    for block in (progress(blocks) if progress else blocks):
        linears = {name: mod for name, mod in block.named_modules() if isinstance(mod, nn.Linear)}
        with run_opt.timed(seconds, "calibration"):
            stats = {name: statistics(method, layer.in_features, layer.weight.device)
                     for name, layer in linears.items()}
            handles = [layer.register_forward_hook(
                lambda mod, inp, out, add=stats[name][0]: add(inp[0].detach()))
                for name, layer in linears.items()]
            try:
                for args, kwargs in calls:
                    block(*args, **kwargs)
            finally:
                for h in handles:
                    h.remove()
        with run_opt.timed(seconds, "updates"):
            for name, layer in linears.items():
                prune_layer(layer, stats[name][1](), method, sparsity, n, m)
        with run_opt.timed(seconds, "calibration"):        # inputs of the next block
            calls = [((_first(block(*args, **kwargs)), *args[1:]), kwargs)
                     for args, kwargs in calls]
    return seconds


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def parse_structure(text):
    """'unstructured' -> (0, 0); 'N:M' -> (N, M) with 0 < N < M, parsed as surgeon.py does."""
    try:
        structure = surgeon.structure_of(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    if isinstance(structure, surgeon.RowCol):
        raise argparse.ArgumentTypeError("SparseGPT and Wanda remove no whole rows or columns")
    return (structure.N, structure.M) if isinstance(structure, surgeon.NM) else (0, 0)


def add_data_flags(p, *extra):
    """run_opt.py's flags for the model, the text, the windows, the device and the record, and
    those of `extra` among --dtype and --save."""
    flags = [("--model", {"default": "facebook/opt-125m"}), ("--train-file", {}),
             ("--test-file", {}), ("--nsamples", {"type": command.positive, "default": 128}),
             ("--seqlen", {"type": command.positive}),
             ("--eval-windows", {"type": command.positive}),
             ("--seed", {"type": int, "default": 0}), ("--device", {}), ("--json", {})]
    optional = {"--dtype": {"choices": command.DTYPES}, "--save": {}}
    for flag, kw in flags + [(flag, optional[flag]) for flag in extra]:
        p.add_argument(flag, help="as in run_opt.py", **kw)


def main(argv=None):
    return command.command_line(run, argv)


def run(argv=None):
    p = command.Parser(description=__doc__.split("\n")[0], formatter_class=command.Help)
    p.add_argument("--method", choices=METHODS, required=True)
    p.add_argument("--structure", default="unstructured", help="unstructured or N:M (2:4, ...)")
    p.add_argument("--sparsity", type=command.fraction, default=0.5,
                   help="unstructured: fraction removed from every layer (default %(default)s); "
                        "N:M removes N/M")
    add_data_flags(p, "--dtype", "--save")
    p.add_argument("--skip-dense-eval", action="store_true", help="do not evaluate the dense model")
    args = p.parse_args(argv)
    try:
        n, m = parse_structure(args.structure)
    except argparse.ArgumentTypeError as err:
        p.error(str(err))
    device = scale.check_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    args.dtype = args.dtype or ("auto" if device.type == "cuda" else "float32")
    if args.json:
        command.writable_file(args.json, "--json")
    if args.save:
        command.writable_folder(args.save, "--save", command.SAVED)
    return run_opt.pipeline(args, device, Peer(args.method, args.structure,
                                               n / m if n else args.sparsity, n, m))


class Peer(run_opt.Pruner):
    """SparseGPT or Wanda in run_opt's pipeline: block by block, in one shot."""

    def __init__(self, method, structure, sparsity, n, m):
        self.method, self.structure, self.sparsity, self.n, self.m = \
            method, structure, sparsity, n, m

    def check_model(self, model, layers, calib):
        if self.n and any(layer.in_features % self.m for layer in layers.values()):
            command.fail(f"{self.structure} needs input widths divisible by {self.m}")

    def prune(self, model, layers, calib, test, device, record):
        from tqdm import tqdm
        print(f"pruning {self.structure} {self.sparsity:.0%} with {self.method}, block by block")
        seconds = prune(model, calib, self.method, 0 if self.n else self.sparsity, self.n, self.m,
                        progress=lambda it: tqdm(it, desc="blocks", leave=False, file=sys.stderr))
        sparsity = surgeon.overall_sparsity(layers)
        return {"sparsity": sparsity, "layers": surgeon.layer_sparsity(layers),
                "shots": [{"shot": 1, "target": self.sparsity, "sparsity": sparsity,
                           "seconds": seconds}]}


if __name__ == "__main__":
    main()

"""SliceGPT, the structured peer, written from its paper: Ashkboos, Croci, do Nascimento,
Hoefler and Hensman, "SliceGPT: Compress Large Language Models by Deleting Rows and Columns",
ICLR 2024 (arXiv 2401.15024).

    python benchmarks/slicegpt.py --slicing 0.25 --model DIR --train-file TRAIN --test-file TEST \\
        --json OUT.json [--save DIR]

1. Computational invariance (Sec. 3.1-3.2): every norm becomes a scale-free RMSNorm. Its scale
   (and LayerNorm's shift) go into the linear layers that read it; LayerNorm's mean subtraction
   goes into everything that writes to the residual stream (embeddings, attention and MLP
   outputs), whose outputs are then zero-mean. The tied output embedding is untied first.
2. Rotation and slicing, block by block (Sec. 3.3-3.4): the residual stream at each point where
   it is read (the attention's input, the MLP's input, the head's input) is rotated by the
   eigenvectors Q of its covariance over the calibration tokens, taken through the blocks
   already sliced, and only its first d' = (1 - slicing) D directions are kept. Readers get
   W Q[:, :d'], writers Q[:, :d']^T W, and the residual connection between two rotations Q_i,
   Q_j a shortcut matrix Q_i[:, :d']^T Q_j[:, :d'] (d', d'). The last block's output, which
   the head reads, is rotated but not sliced (the authors' code slices the head only on request):
   its MLP writes all D directions and its shortcut is (d', D).

With --slicing 0 the rotated model computes the dense model's function (the tests hold its
logits to the dense ones). OPT (pre-norm, no projections) and Llama-family models.
"""
import copy
import json
import os
import sys
import time

import torch
import torch.nn as nn

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)                 # run as a script: the repository's modules
import command  # noqa: E402
import run_opt  # noqa: E402
import scale  # noqa: E402
from benchmarks.peers.sparsegpt_wanda import add_data_flags, block_inputs  # noqa: E402

SPEC = "slicegpt.json"                   # beside a saved model: what `load` rebuilds


class RMSNorm(nn.Module):
    """x / sqrt(|x|^2 / D + eps): a norm without scale that divides by the unsliced width D, so
    that it sees a sliced stream as it saw the whole one (|x Q[:, :d']| <= |x|)."""

    def __init__(self, width: int, eps: float):
        super().__init__()
        self.width, self.eps = width, eps

    def forward(self, x):
        z = x.float()
        return (z * torch.rsqrt(z.square().sum(-1, keepdim=True) / self.width + self.eps)).to(
            x.dtype)


class Architecture:
    """Where OPT and Llama keep their parts."""

    def __init__(self, model):
        self.model = model
        inner = model.model
        self.opt = hasattr(inner, "decoder")
        if self.opt:
            dec = inner.decoder
            if dec.project_in is not None or not model.config.do_layer_norm_before:
                raise ValueError("SliceGPT here needs a pre-norm OPT without projections")
            self.embeddings, self.blocks = [dec.embed_tokens, dec.embed_positions], dec.layers
            self.final = (dec, "final_layer_norm")
        else:
            self.embeddings, self.blocks = [inner.embed_tokens], inner.layers
            self.final = (inner, "norm")

    @staticmethod
    def inner(block):
        return block.block if isinstance(block, Sliced) else block

    def norms(self, block):
        """(parent, name) of the norm before the attention and before the MLP."""
        b = self.inner(block)
        return ((b, "self_attn_layer_norm"), (b, "final_layer_norm")) if self.opt else \
            ((b, "input_layernorm"), (b, "post_attention_layernorm"))

    def readers(self, block):
        """The linear layers that read the attention's input, and the MLP's."""
        b = self.inner(block)
        attn = [b.self_attn.q_proj, b.self_attn.k_proj, b.self_attn.v_proj]
        return (attn, [b.fc1]) if self.opt else (attn, [b.mlp.gate_proj, b.mlp.up_proj])

    def writers(self, block):
        """The linear layers that write to the residual stream: attention output, MLP output."""
        b = self.inner(block)
        return (b.self_attn.out_proj, b.fc2) if self.opt else (b.self_attn.o_proj, b.mlp.down_proj)


class Sliced(nn.Module):
    """A decoder block whose residual connections carry shortcut matrices (None: identity)."""

    def __init__(self, block, opt: bool):
        super().__init__()
        self.block, self.opt = block, opt
        self.attn_shortcut = self.mlp_shortcut = None

    def attention(self, x, kwargs):
        norm = self.block.self_attn_layer_norm if self.opt else self.block.input_layernorm
        return self.block.self_attn(hidden_states=norm(x), **kwargs)[0]

    def mlp(self, x):
        b = self.block
        if self.opt:
            return b.fc2(b.activation_fn(b.fc1(b.final_layer_norm(x))))
        return b.mlp(b.post_attention_layernorm(x))

    @staticmethod
    def shortcut(x, S):
        return x if S is None else x @ S.to(x.dtype)

    def forward(self, hidden_states, *args, **kwargs):
        x = self.shortcut(hidden_states, self.attn_shortcut) + self.attention(hidden_states, kwargs)
        return self.shortcut(x, self.mlp_shortcut) + self.mlp(x)


# ----------------------------------------------------------------------------------------------
# 1. Computational invariance


@torch.no_grad()
def untie_head(model):
    head = model.get_output_embeddings()
    head.weight = nn.Parameter(head.weight.detach().clone())
    model.config.tie_word_embeddings = False
    if hasattr(model, "_tied_weights_keys"):
        model._tied_weights_keys = None


@torch.no_grad()
def fold_norm(parent, name, readers):
    """The norm's scale (and shift) into its readers; the norm becomes RMSNorm."""
    norm = getattr(parent, name)
    gamma = norm.weight.double()
    beta = getattr(norm, "bias", None)
    for layer in readers:
        W = layer.weight.double()
        if beta is not None:
            b = W @ beta.double() + (layer.bias.double() if layer.bias is not None else 0)
            if layer.bias is None:
                layer.bias = nn.Parameter(torch.zeros(layer.out_features, dtype=layer.weight.dtype,
                                                      device=layer.weight.device))
            layer.bias.copy_(b.to(layer.bias.dtype))
        layer.weight.copy_((W * gamma).to(layer.weight.dtype))
    eps = getattr(norm, "eps", None) or getattr(norm, "variance_epsilon")
    setattr(parent, name, RMSNorm(len(gamma), eps))


@torch.no_grad()
def center(module):
    """Writers of the residual stream: their outputs get zero mean over the width (LayerNorm's
    mean subtraction, moved out of the norm)."""
    if isinstance(module, nn.Embedding):
        W = module.weight.double()
        module.weight.copy_((W - W.mean(1, keepdim=True)).to(module.weight.dtype))
    else:
        W = module.weight.double()
        module.weight.copy_((W - W.mean(0, keepdim=True)).to(module.weight.dtype))
        if module.bias is not None:
            module.bias.copy_((module.bias.double() - module.bias.double().mean()).to(
                module.bias.dtype))


def make_invariant(model) -> Architecture:
    """Step 1 in place: untied head, scale-free norms, blocks wrapped in Sliced (identity)."""
    arch = Architecture(model)
    untie_head(model)
    for i, block in enumerate(arch.blocks):
        (n1, n2), (r1, r2) = arch.norms(block), arch.readers(block)
        fold_norm(*n1, r1)
        fold_norm(*n2, r2)
        if arch.opt:
            for writer in arch.writers(block):
                center(writer)
        arch.blocks[i] = Sliced(block, arch.opt)
    fold_norm(*arch.final, [model.get_output_embeddings()])
    if arch.opt:
        for embedding in arch.embeddings:
            center(embedding)
    return arch


# ----------------------------------------------------------------------------------------------
# 2. Rotation and slicing


def principal_directions(signals):
    """Eigenvectors of sum x^T x over every token of every window, largest eigenvalue first
    (float64), and the eigenvalues."""
    C = sum(x.reshape(-1, x.shape[-1]).double().T @ x.reshape(-1, x.shape[-1]).double()
            for x in signals)
    values, vectors = torch.linalg.eigh(C)
    return vectors.flip(1), values.flip(0)


@torch.no_grad()
def read_through(layers, Q):
    """Readers of a stream now given as x Q (d' columns): W -> W Q."""
    for layer in layers:
        layer.weight = nn.Parameter((layer.weight.double() @ Q).to(layer.weight.dtype))
        layer.in_features = Q.shape[1]


@torch.no_grad()
def write_through(layer, Q):
    """A writer whose output is to be x Q: W -> Q^T W, b -> Q^T b."""
    layer.weight = nn.Parameter((Q.T @ layer.weight.double()).to(layer.weight.dtype))
    if layer.bias is not None:
        layer.bias = nn.Parameter((Q.T @ layer.bias.double()).to(layer.bias.dtype))
    layer.out_features = Q.shape[1]


@torch.no_grad()
def rotate_and_slice(model, arch: Architecture, windows, width: int, progress=None):
    """Step 2 in place, keeping `width` directions (all D at the head's input); returns the
    eigenvalues seen at each point."""
    calls = block_inputs(model, arch.blocks, windows)              # the embeddings' outputs
    xs = [args[0].double() for args, _ in calls]
    Q, values = principal_directions(xs)
    Q = Q[:, :width].to(xs[0].device)
    seen = [values]
    for embedding in arch.embeddings:
        embedding.weight = nn.Parameter((embedding.weight.double() @ Q).to(embedding.weight.dtype))
        embedding.embedding_dim = width
    xs = [x @ Q for x in xs]                                       # the sliced stream

    def turn(xs, Q, added, writer, keep=width):
        """The stream (kept coordinates of Q) plus what a writer adds (width D): its principal
        directions Q_new (the first `keep`), the writer rotated to them; the new stream, Q_new
        and the shortcut."""
        full = [x @ Q.T + a for x, a in zip(xs, added)]
        Q_new, values = principal_directions(full)
        Q_new = Q_new[:, :keep]
        seen.append(values)
        write_through(writer, Q_new)
        return [y @ Q_new for y in full], Q_new, nn.Parameter(Q.T @ Q_new, requires_grad=False)

    last = arch.blocks[-1]
    for block in (progress(arch.blocks) if progress else arch.blocks):
        (r_attn, r_mlp), (w_attn, w_mlp) = arch.readers(block), arch.writers(block)
        read_through(r_attn, Q)
        attn = [block.attention(x.to(args[0].dtype), kwargs).double()
                for x, (args, kwargs) in zip(xs, calls)]
        xs, Q, block.attn_shortcut = turn(xs, Q, attn, w_attn)      # the MLP's input
        read_through(r_mlp, Q)
        mlp = [block.mlp(x.to(args[0].dtype)).double() for x, (args, _) in zip(xs, calls)]
        keep = len(Q) if block is last else width                   # the head reads all D
        xs, Q, block.mlp_shortcut = turn(xs, Q, mlp, w_mlp, keep)   # the block's output
    read_through([model.get_output_embeddings()], Q)
    dtype = model.get_output_embeddings().weight.dtype
    for block in arch.blocks:
        for S in (block.attn_shortcut, block.mlp_shortcut):
            S.data = S.data.to(dtype)
    return seen


def width_for(model, slicing):
    """d' = the width that keeps (1 - slicing) of the hidden width D, to a multiple of 8."""
    D = model.config.hidden_size
    return max(8, int(round((1 - slicing) * D / 8)) * 8) if slicing else D


def block_weights(model, width=None):
    """The blocks' linear weights at width d' (default: the model's), shortcut matrices counted;
    the last block's MLP output and shortcut write all D directions."""
    c = model.config
    D, d = c.hidden_size, width or c.hidden_size
    heads = getattr(c, "num_attention_heads")
    head_dim = getattr(c, "head_dim", None) or D // heads
    kv = getattr(c, "num_key_value_heads", None) or heads
    mlp = getattr(c, "intermediate_size", None) or c.ffn_dim
    gated = hasattr(c, "intermediate_size")
    per_block = d * (heads + 2 * kv) * head_dim + heads * head_dim * d + \
        (3 if gated else 2) * d * mlp + (2 * d * d if width else 0)
    last = (D - d) * mlp + ((D - d) * d if width else 0)        # its MLP writes D, shortcut (d', D)
    return c.num_hidden_layers * per_block + last


def model_params(arch: Architecture, width: int) -> int:
    """Parameters of the whole model at width d', from the invariant model `arch` (untied head,
    scale-free norms) before slicing: embeddings (V, d'), the blocks as `block_weights` counts
    them, the writers' biases d' (D for the last MLP's); every other parameter as it is."""
    model, D = arch.model, arch.model.config.hidden_size
    sliced = sum(e.weight.numel() for e in arch.embeddings)        # embeddings' D axis
    sliced += sum(w.bias.numel() for block in arch.blocks[:-1] for w in arch.writers(block)
                  if w.bias is not None)
    w = arch.writers(arch.blocks[-1])[0]
    sliced += w.bias.numel() if w.bias is not None else 0
    linear = sum(layer.weight.numel() for block in arch.blocks
                 for layer in [*sum(arch.readers(block), []), *arch.writers(block)])
    total = sum(p.numel() for p in model.parameters())
    return total - linear + block_weights(model, width) - sliced + sliced * width // D


def largest_width(fits, D):
    """The largest d' (a multiple of 8, at least 8) for which fits(d') holds."""
    return next((d for d in range(D, 7, -8) if fits(d)), 8)


def slicing_for_removal(model, removed):
    """The largest d' whose blocks keep at most (1 - removed) of the dense blocks' linear
    weights, shortcut matrices counted as kept weights."""
    dense = block_weights(model)
    return largest_width(lambda d: block_weights(model, d) <= (1 - removed) * dense,
                         model.config.hidden_size)


def width_for_params(arch: Architecture, params: int) -> int:
    """The largest d' whose whole model has at most `params` parameters."""
    return largest_width(lambda d: model_params(arch, d) <= params, arch.model.config.hidden_size)


def slice_model(model, windows, width, progress=None, arch=None):
    """SliceGPT in place: the invariant form (unless `arch` says it is made already), then
    rotation and slicing to `width`."""
    rotate_and_slice(model, arch or make_invariant(model), windows, width, progress)
    model.config.slicegpt_width = width
    return model


# ----------------------------------------------------------------------------------------------
# Saving and loading


def save(model, tokenizer, folder):
    """The sliced model's weights and config, and SPEC (its width), which `load` reads."""
    os.makedirs(folder, exist_ok=True)
    config = model.config.to_dict()
    config.pop("slicegpt_width", None)
    with open(os.path.join(folder, SPEC), "w") as f:
        json.dump({"width": model.config.slicegpt_width, "config": config}, f)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    from safetensors.torch import save_file
    save_file(state, os.path.join(folder, "model.safetensors"))
    tokenizer.save_pretrained(folder)


def load(folder):
    """A model that `save` wrote: built from its config, made invariant and sliced in shape,
    then its weights loaded."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM
    with open(os.path.join(folder, SPEC)) as f:
        spec = json.load(f)
    config = dict(spec["config"])
    config = AutoConfig.for_model(config.pop("model_type"), **config)
    config.tie_word_embeddings = False
    model = AutoModelForCausalLM.from_config(config)
    arch = make_invariant(model)
    state = load_file(os.path.join(folder, "model.safetensors"))
    for block in arch.blocks:
        block.attn_shortcut = nn.Parameter(torch.zeros(1), requires_grad=False)
        block.mlp_shortcut = nn.Parameter(torch.zeros(1), requires_grad=False)
    for name, module in model.named_modules():            # shapes as saved
        for key in ("weight", "bias", "attn_shortcut", "mlp_shortcut"):
            full = f"{name}.{key}" if name else key
            p = getattr(module, key, None)
            if isinstance(p, nn.Parameter) and full in state and p.shape != state[full].shape:
                setattr(module, key, nn.Parameter(torch.empty_like(state[full]),
                                                  requires_grad=key in ("weight", "bias")))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or missing:
        raise ValueError(f"{folder}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for module in model.modules():
        if isinstance(module, nn.Linear):
            module.out_features, module.in_features = module.weight.shape
        elif isinstance(module, nn.Embedding):
            module.embedding_dim = module.weight.shape[1]
    model.config.slicegpt_width = spec["width"]
    return model.eval()


# ----------------------------------------------------------------------------------------------
# The command line: run_opt.py's data, evaluation and record


def main(argv=None):
    return command.command_line(run, argv)


def run(argv=None):
    p = command.Parser(description=__doc__.split("\n")[0], formatter_class=command.Help)
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--slicing", type=command.fraction,
                       help="fraction of the hidden width sliced off (the paper's setting)")
    group.add_argument("--remove", type=command.fraction,
                       help="fraction of the blocks' linear weights to remove, the shortcut "
                            "matrices counted as weights kept")
    group.add_argument("--match-rowcol", type=command.fraction, metavar="F",
                       help="as many parameters in the whole model as the dense one keeps with a "
                            "fraction F of its blocks' linear weights removed (rows and columns "
                            "pruned to F, zeros not counted)")
    add_data_flags(p, "--save")
    p.add_argument("--compact-latency", action="store_true",
                   help="time the forward pass of 8 test windows, dense and sliced")
    p.add_argument("--skip-dense-eval", action="store_true", help="do not evaluate the dense model")
    args = p.parse_args(argv)
    args.dtype = "float32"
    device = scale.check_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.json:
        command.writable_file(args.json, "--json")
    if args.save:
        command.writable_folder(args.save, "--save", SPEC)
    return run_opt.pipeline(args, device, Slicer(args))


class Slicer(run_opt.Pruner):
    """SliceGPT in run_opt's pipeline: the width from --slicing, --remove or --match-rowcol;
    the record gains width, hidden_size, blocks_weights_dense/kept, params_compact and, with
    --compact-latency, latency_ms_dense and latency_ms_compact."""

    def __init__(self, args):
        self.args = args

    def prune(self, model, layers, calib, test, device, record):
        from tqdm import tqdm
        args = self.args
        dense_blocks, params_dense = block_weights(model), record["params_dense"]
        batch = torch.cat(test[:8]).to(device)
        dense = copy.deepcopy(model) if args.compact_latency else None  # timed beside the sliced
        D = model.config.hidden_size
        arch = make_invariant(model)
        if args.slicing is not None:
            width = width_for(model, args.slicing)
        elif args.remove is not None:
            width = slicing_for_removal(model, args.remove)
        else:
            width = width_for_params(arch, params_dense - round(args.match_rowcol * dense_blocks))
        print(f"slicing the hidden width {D} -> {width}")
        tic = time.perf_counter()
        slice_model(model, calib, width, arch=arch,
                    progress=lambda it: tqdm(it, desc="blocks", leave=False, file=sys.stderr))
        seconds = time.perf_counter() - tic
        if dense is not None:                       # one right after the other: the same load
            record["latency_ms_dense"] = run_opt.latency_ms(dense, batch)
            record["latency_ms_compact"] = run_opt.latency_ms(model, batch)
            del dense
            print(f"forward latency, batch {tuple(batch.shape)}: dense "
                  f"{record['latency_ms_dense']:.0f} ms -> sliced "
                  f"{record['latency_ms_compact']:.0f} ms")
        kept = block_weights(model, width)
        record.update(width=width, hidden_size=D, blocks_weights_dense=dense_blocks,
                      blocks_weights_kept=kept,
                      params_compact=sum(p.numel() for p in model.parameters()))
        print(f"blocks' linear weights: {dense_blocks / 1e6:.1f}M -> {kept / 1e6:.1f}M "
              f"({1 - kept / dense_blocks:.1%} removed, shortcut matrices counted); parameters "
              f"{params_dense / 1e6:.1f}M -> {record['params_compact'] / 1e6:.1f}M")
        return {"sparsity": 1 - kept / dense_blocks, "layers": {},
                "shots": [{"shot": 1, "target": args.remove, "sparsity": 1 - kept / dense_blocks,
                           "seconds": {"prune": seconds}}]}

    def save(self, model, tokenizer, folder, after, record):
        save(model, tokenizer, folder)


if __name__ == "__main__":
    main()

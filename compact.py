"""Compaction: after rows-and-columns pruning, cut what is dead out of the weight matrices, so
that the model really gets smaller and faster. Not part of the paper's method, and model-aware
in the names it looks for: an MLP is (fc1, fc2) as in OPT or (gate_proj, up_proj, down_proj) as
in Llama; attention is q/k/v_proj with o_proj, out_proj or dense and a head_dim attribute
(units.py knows them).

"Dead" means: removing it changes no output of the model.
"""
import inspect
import json
import os

import torch
import torch.nn as nn

from surgeon import get_matrix, prunable_layers
from units import kind_of, mlp_of, output_of, silent_at_zero


def _all_zero(x: torch.Tensor) -> torch.Tensor:
    """(k, ...) -> (k,): True where the slice x[i] is all zero (an empty slice is)."""
    return x.eq(0).flatten(1).all(1)
@torch.no_grad()
def _keep(layer: nn.Linear, rows=None, cols=None):
    """Shrink a layer in place to the kept output rows / input columns."""
    W = layer.weight
    W = W[rows] if rows is not None else W
    W = W[:, cols] if cols is not None else W
    layer.weight = nn.Parameter(W.clone(), requires_grad=layer.weight.requires_grad)
    if layer.bias is not None and rows is not None:
        layer.bias = nn.Parameter(layer.bias[rows].clone(), requires_grad=layer.bias.requires_grad)
    layer.out_features, layer.in_features = W.shape


@torch.no_grad()
def _compact_mlp(up: list[nn.Linear], down: nn.Linear, act, gated: bool,
                 multiple: int = 1) -> tuple[int, int]:
    """Remove hidden units that cannot change the output. Ungated (OPT): unit i is dead when
    down's column i is zero, or when up's row i is zero in its weights, so that it outputs the
    constant act(b_i), which is folded into down's bias. Gated (Llama): act(gate x) * (up x) is
    zero when either row is zero with zero bias (act(0) = 0 for SiLU) or down's column is.
    Then zero units are appended until the width is a multiple of `multiple` (matrix kernels
    run faster on such widths). Returns (units removed, zero units appended)."""
    dead = _all_zero(down.weight.T)
    if gated:
        gate, lin = up
        dead |= _all_zero(get_matrix(lin)) | (_all_zero(get_matrix(gate)) & silent_at_zero(act))
    else:
        (fc1,) = up
        const = act(fc1.bias) if fc1.bias is not None else fc1.weight.new_zeros(len(fc1.weight))
        constant = _all_zero(fc1.weight) & ((const == 0) | (down.bias is not None))
        if down.bias is not None:
            down.bias += down.weight[:, constant] @ const[constant]
        dead |= constant
    keep = (~dead).nonzero()[:, 0]
    for layer in up:
        _keep(layer, rows=keep)
    _keep(down, cols=keep)
    pad = -len(keep) % multiple
    for layer in up:
        _pad(layer, rows=pad)
    _pad(down, cols=pad)
    return int(dead.sum()), pad


@torch.no_grad()
def _pad(layer: nn.Linear, rows=0, cols=0):
    """Append zero output rows (with zero bias) and zero input columns to a layer in place."""
    if rows or cols:
        W = nn.functional.pad(layer.weight, (0, cols, 0, rows))
        layer.weight = nn.Parameter(W, requires_grad=layer.weight.requires_grad)
        if layer.bias is not None and rows:
            layer.bias = nn.Parameter(nn.functional.pad(layer.bias, (0, rows)),
                                      requires_grad=layer.bias.requires_grad)
        layer.out_features, layer.in_features = W.shape


@torch.no_grad()
def _compact_attention(attn: nn.Module) -> int:
    """Remove query heads whose output is exactly zero (their o/out_proj columns are zero, or
    the v rows, with bias, of their key-value head are), then key-value heads that no query
    head reads. Where the key-value groups that remain are uneven, k and v outputs are expanded
    to one head per query head (_expand_kv), so that attention computes as if multi-head.
    Returns the query heads removed."""
    q, k, v = attn.q_proj, attn.k_proj, attn.v_proj
    o = output_of(attn)
    d, dev = attn.head_dim, q.weight.device
    heads, kv = q.out_features // d, k.out_features // d
    kv_of = torch.tensor(getattr(attn, "kv_index", None) or
                         [h * kv // heads for h in range(heads)], device=dev)   # (heads,)
    dead = _all_zero(o.weight.T.reshape(heads, d, -1)) | \
        _all_zero(get_matrix(v).reshape(kv, d, -1))[kv_of]
    if dead.all():                                      # no head left: the block is skipped
        none = torch.zeros(0, dtype=torch.long, device=dev)
        for layer in (q, k, v):
            _keep(layer, rows=none)
        _keep(o, cols=none)
        _headless(attn)
        return heads
    keep_q = (~dead).nonzero()[:, 0]
    keep_kv, kv_of = torch.unique(kv_of[keep_q], return_inverse=True)        # sorted
    rows = lambda idx: (idx[:, None] * d + torch.arange(d, device=dev)).flatten()  # noqa: E731
    _keep(q, rows=rows(keep_q))
    _keep(k, rows=rows(keep_kv))
    _keep(v, rows=rows(keep_kv))
    _keep(o, cols=rows(keep_q))
    for name, value in (("num_heads", len(keep_q)), ("num_key_value_heads", len(keep_kv))):
        if hasattr(attn, name):
            setattr(attn, name, value)
    group = len(keep_q) // len(keep_kv)
    even = torch.equal(kv_of, torch.arange(len(keep_q), device=dev) // group)
    _expand_kv(attn, None if even else kv_of.tolist())
    if hasattr(attn, "num_key_value_groups"):
        attn.num_key_value_groups = group if even else 1
    return int(dead.sum())


def _expand_kv(attn: nn.Module, kv_index):
    """k_proj and v_proj output one head per query head (query head h reads key-value head
    kv_index[h]) through forward hooks, or, with kv_index None, their own heads."""
    for handle in getattr(attn, "_kv_hooks", []):
        handle.remove()
    attn.kv_index, attn._kv_hooks = kv_index, []
    if kv_index is None:
        return
    index, d = torch.tensor(kv_index, device="cpu"), attn.head_dim    # not meta, where models
                                                                    # are built to be loaded

    def expand(layer, inputs, y):                     # (..., kv * d) -> (..., heads * d)
        return y.unflatten(-1, (-1, d)).index_select(-2, index.to(y.device)).flatten(-2)
    attn._kv_hooks = [attn.k_proj.register_forward_hook(expand),
                      attn.v_proj.register_forward_hook(expand)]
    if hasattr(attn, "num_key_value_groups"):
        attn.num_key_value_groups = 1


def uncuttable(model: nn.Module) -> list[str]:
    """What compaction finds nothing to cut in, in a model's blocks: "MLP", "attention" or both
    (fused projections such as Phi3's qkv_proj and gate_up_proj, GPT-NeoX's query_key_value).
    The model may be a skeleton on the meta device."""
    blocks = max((len(m) for m in model.modules() if isinstance(m, nn.ModuleList)), default=0)
    kinds = [kind_of(m) for m in model.modules()]
    mlps, attentions = sum(k in ("ungated", "gated") for k in kinds), kinds.count("attention")
    return [what for what, n in (("MLP", mlps), ("attention", attentions)) if n < blocks]


def compact(model: nn.Module, multiple: int = 1) -> dict:
    """Cut dead MLP units and attention heads out of the weight matrices; the function computed
    stays the same. Zeros elsewhere stay: in heads and units that still work, and in input
    columns that read the residual stream, whose width every block shares. With `multiple` > 1
    each MLP is then padded with zero units to a width that is a multiple of it. Returns counts
    and the new shapes (for `resize`)."""
    report = {"params_before": sum(p.numel() for p in model.parameters()),
              "mlp_units_removed": 0, "mlp_units_padded": 0, "heads_removed": 0}
    for module in list(model.modules()):
        kind = kind_of(module)
        if kind in ("ungated", "gated"):
            removed, padded = _compact_mlp(*mlp_of(module, kind), kind == "gated", multiple)
            report["mlp_units_removed"] += removed
            report["mlp_units_padded"] += padded
        elif kind == "attention":
            report["heads_removed"] += _compact_attention(module)
    layers = prunable_layers(model)
    report["params_after"] = sum(p.numel() for p in model.parameters())
    report["zeros_kept"] = sum(int((l.weight == 0).sum()) for l in layers.values())
    report["zero_columns_kept"] = sum(int(_all_zero(l.weight.T).sum()) for l in layers.values()
                                      if l.out_features)             # an emptied MLP's: none
    report["shapes"] = shapes(model)
    return report


def shapes(model: nn.Module) -> dict:
    """What `resize` needs to rebuild a compacted model from its original config."""
    return {"linear": {name: list(m.weight.shape) for name, m in model.named_modules()
                       if isinstance(m, nn.Linear)},
            "heads": {name: {k: getattr(m, k) for k in ("num_heads", "num_key_value_heads",
                                                        "num_key_value_groups", "kv_index")
                             if hasattr(m, k)}
                      for name, m in model.named_modules() if hasattr(m, "head_dim")}}


@torch.no_grad()
def resize(model: nn.Module, spec: dict):
    """Give a freshly built model the shapes of a compacted one (weights still to be loaded)."""
    for name, (out_f, in_f) in spec["linear"].items():
        layer = model.get_submodule(name)
        if tuple(layer.weight.shape) != (out_f, in_f):
            _keep(layer, rows=torch.arange(min(out_f, layer.out_features)),
                  cols=torch.arange(min(in_f, layer.in_features)))
            _pad(layer, rows=out_f - layer.out_features, cols=in_f - layer.in_features)
    for name, attrs in spec["heads"].items():
        attn = model.get_submodule(name)
        for k, value in attrs.items():
            if k != "kv_index":
                setattr(attn, k, value)
        _expand_kv(attn, attrs.get("kv_index"))
        if attn.q_proj.out_features == 0:
            _headless(attn)


def _headless(attn: nn.Module):
    """An attention block without heads outputs its output projection's bias (or zeros) alone,
    and gives a cache, where there is one, keys and values of no head for its positions."""
    out = next(getattr(attn, n) for n in ("o_proj", "out_proj", "dense")  # units.output_of's
               if hasattr(attn, n))        # names: this source goes into modeling_compacted.py

    def forward(hidden_states, *args, **kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values", kwargs.get("past_key_value")))
        if hasattr(cache, "update") and getattr(attn, "layer_idx", None) is not None:
            none = hidden_states.new_zeros(hidden_states.shape[0], 0, hidden_states.shape[1],
                                           attn.head_dim)           # (batch, 0 heads, L, d)
            cache.update(none, none, attn.layer_idx)
        y = hidden_states.new_zeros(*hidden_states.shape[:-1], out.out_features)
        return (y + out.bias if out.bias is not None else y), None
    attn.forward = forward
    for name in ("num_heads", "num_key_value_heads"):
        if hasattr(attn, name):
            setattr(attn, name, 0)


# The saved format: a Hugging Face folder with a modeling file written here (MODELING: the
# model's own classes, made to take the compacted shapes from config.json's "compact") and
# config.json's auto_map naming it, so that
# AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True) loads it.


MODELING = "modeling_compacted.py"
TEMPLATE = '''"""{model_type}, compacted by llm-surgeon (compact.py): its layers have shapes of their own
(config.json's "compact"), which this file gives them. Load the folder with
AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)."""
import torch
import torch.nn as nn
from transformers import {config_class}, {model_class}


class CompactedConfig({config_class}):
    model_type = "{model_type}-compacted"

    def __init__(self, compact=None, **kwargs):
        super().__init__(**kwargs)
        self.compact = compact or {{"linear": {{}}, "heads": {{}}}}


class CompactedForCausalLM({model_class}):
    config_class = CompactedConfig

    def __init__(self, config):
        super().__init__(config)
        resize(self, config.compact)


{functions}'''


# read when this module is imported, so that a run saves the code it ran with, even where this
# file changed on disk since
FUNCTIONS = "\n\n".join(inspect.getsource(f) for f in (_keep, _pad, resize, _expand_kv,
                                                        _headless))


def is_compacted(folder) -> bool:
    return os.path.isfile(os.path.join(folder, MODELING))


def save(model, tokenizer, folder, shapes):
    """save_pretrained, with the shapes (from `compact`) in config.json and the modeling file
    that rebuilds them."""
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        config = json.load(f)
    base = config["model_type"].removesuffix("-compacted")
    model_class, config_class = type(model), type(model.config)
    if model_class.__name__ == "CompactedForCausalLM":       # loaded from a folder saved here
        model_class, config_class = model_class.__base__, config_class.__base__
    with open(os.path.join(folder, MODELING), "w") as f:
        f.write(TEMPLATE.format(model_type=base, config_class=config_class.__name__,
                                model_class=model_class.__name__, functions=FUNCTIONS))
    module = MODELING[:-3]
    config.update(model_type=f"{base}-compacted", compact=shapes,
                  architectures=["CompactedForCausalLM"],
                  auto_map={"AutoConfig": f"{module}.CompactedConfig",
                            "AutoModelForCausalLM": f"{module}.CompactedForCausalLM"})
    with open(path, "w") as f:
        json.dump(config, f, indent=1)


def load(folder, dtype="auto"):
    """The compacted model of a folder that `save` wrote, in `dtype` (auto: as saved)."""
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=dtype)

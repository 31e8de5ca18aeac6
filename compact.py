"""Compaction: after rows-and-columns pruning, cut what is dead out of the weight matrices, so
that the model really gets smaller and faster. Not part of the paper's method, and model-aware
in the names it looks for: an MLP is (fc1, fc2) as in OPT or (gate_proj, up_proj, down_proj) as
in Llama; attention is q/k/v_proj with o_proj or out_proj and a head_dim attribute.

"Dead" means: removing it changes no output of the model.
"""
import json
import os

import torch
import torch.nn as nn

from surgeon import UnitGroup, get_matrix, prunable_layers


def _all_zero(x: torch.Tensor) -> torch.Tensor:
    """(k, ...) -> (k,): True where the slice x[i] is all zero."""
    return x.reshape(len(x), -1).eq(0).all(1)
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
def _compact_mlp(up: list[nn.Linear], down: nn.Linear, act, gated: bool) -> int:
    """Remove hidden units that cannot change the output. Ungated (OPT): unit i is dead when
    down's column i is zero, or when up's row i is zero in its weights, so that it outputs the
    constant act(b_i), which is folded into down's bias. Gated (Llama): act(gate x) * (up x) is
    zero when either row is zero with zero bias (act(0) = 0 for SiLU) or down's column is."""
    dead = _all_zero(down.weight.T)
    if gated:
        gate, lin = up
        silu_like = bool(act(torch.zeros(1)) == 0)
        dead |= _all_zero(get_matrix(lin)) | (_all_zero(get_matrix(gate)) & silu_like)
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
    return int(dead.sum())


@torch.no_grad()
def _compact_attention(attn: nn.Module) -> int:
    """Remove heads whose output is exactly zero: their o/out_proj columns are zero, or their
    v rows (with bias) are. With grouped k/v heads, only whole groups go. Returns heads removed."""
    q, k, v = attn.q_proj, attn.k_proj, attn.v_proj
    o = attn.o_proj if hasattr(attn, "o_proj") else attn.out_proj
    d, dev = attn.head_dim, q.weight.device
    heads, kv = q.out_features // d, k.out_features // d
    group = heads // kv
    dead_heads = _all_zero(o.weight.T.reshape(heads, d, -1)) | \
        _all_zero(get_matrix(v).reshape(kv, d, -1)).repeat_interleave(group)
    dead_groups = dead_heads.reshape(kv, group).all(1)    # whole groups only
    dead_groups[0] &= not dead_groups.all()             # attention needs a head
    keep_kv = (~dead_groups).nonzero()[:, 0]
    keep_q = (keep_kv[:, None] * group + torch.arange(group, device=dev)).flatten()
    rows_q = (keep_q[:, None] * d + torch.arange(d, device=dev)).flatten()
    rows_kv = (keep_kv[:, None] * d + torch.arange(d, device=dev)).flatten()
    _keep(q, rows=rows_q)
    _keep(k, rows=rows_kv)
    _keep(v, rows=rows_kv)
    _keep(o, cols=rows_q)
    for name, value in (("num_heads", len(keep_q)), ("num_key_value_heads", len(keep_kv))):
        if hasattr(attn, name):
            setattr(attn, name, value)
    return int(dead_groups.sum()) * group


def _kind(module: nn.Module) -> str | None:
    """'ungated' (OPT's MLP), 'gated' (Llama's), 'attention', or None: what compaction can cut."""
    for kind, names in (("ungated", ("fc1", "fc2", "activation_fn")),
                        ("gated", ("gate_proj", "up_proj", "down_proj", "act_fn")),
                        ("attention", ("q_proj", "k_proj", "v_proj", "head_dim"))):
        if all(hasattr(module, n) for n in names):
            return kind
    return None


def uncuttable(model: nn.Module) -> list[str]:
    """What compaction finds nothing to cut in, in a model's blocks: "MLP", "attention" or both
    (fused projections such as Phi3's qkv_proj and gate_up_proj, GPT-NeoX's query_key_value).
    The model may be a skeleton on the meta device."""
    blocks = max((len(m) for m in model.modules() if isinstance(m, nn.ModuleList)), default=0)
    kinds = [_kind(m) for m in model.modules()]
    mlps, attentions = sum(k in ("ungated", "gated") for k in kinds), kinds.count("attention")
    return [what for what, n in (("MLP", mlps), ("attention", attentions)) if n < blocks]


def units(model: nn.Module) -> list[UnitGroup]:
    """The heads and MLP units of every block, as surgeon's structure "units" takes them: an MLP
    unit is cut by its gate row, its up row or its down column (OPT: its fc1 row with the bias,
    or its fc2 column), where act(0) = 0 for the rows; a head by its o_proj columns, or by its v
    rows where it owns them. Grouped-query k and v rows are shared by their query heads."""
    names = {module: name for name, module in model.named_modules()}
    groups = []
    for module in model.modules():
        kind = _kind(module)
        if kind == "ungated":
            fc1, fc2 = names[module.fc1], names[module.fc2]
            silent = _silent_at_zero(module.activation_fn)
            groups.append(UnitGroup(module.fc1.out_features, [(fc1, "rows", 1), (fc2, "cols", 1)],
                                    [0, 1] if silent else [1]))
        elif kind == "gated":
            gate, up, down = (names[getattr(module, n)] for n in ("gate_proj", "up_proj",
                                                                  "down_proj"))
            silent = _silent_at_zero(module.act_fn)
            groups.append(UnitGroup(module.gate_proj.out_features,
                                    [(gate, "rows", 1), (up, "rows", 1), (down, "cols", 1)],
                                    [0, 1, 2] if silent else [1, 2]))
        elif kind == "attention":
            q, k, v = (names[getattr(module, n)] for n in ("q_proj", "k_proj", "v_proj"))
            o = names[module.o_proj if hasattr(module, "o_proj") else module.out_proj]
            d = module.head_dim
            heads, kv = module.q_proj.out_features // d, module.k_proj.out_features // d
            if kv == heads:
                groups.append(UnitGroup(heads, [(q, "rows", d), (k, "rows", d), (v, "rows", d),
                                                (o, "cols", d)], [3, 2]))
            else:
                groups.append(UnitGroup(heads, [(q, "rows", d), (o, "cols", d)], [1],
                                        [(k, "rows", d, heads // kv), (v, "rows", d, heads // kv)]))
    return groups


def _silent_at_zero(act) -> bool:
    return bool(act(torch.zeros(1)) == 0)


def compact(model: nn.Module) -> dict:
    """Cut dead MLP units and attention heads out of the weight matrices; the function computed
    stays the same. Zeros elsewhere stay: in heads and units that still work, and in input
    columns that read the residual stream, whose width every block shares. Returns counts and
    the new shapes (for `resize`)."""
    report = {"params_before": sum(p.numel() for p in model.parameters()),
              "mlp_units_removed": 0, "heads_removed": 0}
    for module in list(model.modules()):
        kind = _kind(module)
        if kind == "ungated":
            report["mlp_units_removed"] += _compact_mlp([module.fc1], module.fc2,
                                                        module.activation_fn, gated=False)
        elif kind == "gated":
            report["mlp_units_removed"] += _compact_mlp([module.gate_proj, module.up_proj],
                                                        module.down_proj, module.act_fn, gated=True)
        elif kind == "attention":
            report["heads_removed"] += _compact_attention(module)
    layers = prunable_layers(model)
    report["params_after"] = sum(p.numel() for p in model.parameters())
    report["zeros_kept"] = sum(int((l.weight == 0).sum()) for l in layers.values())
    report["zero_columns_kept"] = sum(int(_all_zero(l.weight.T).sum()) for l in layers.values())
    report["shapes"] = shapes(model)
    return report


def shapes(model: nn.Module) -> dict:
    """What `resize` needs to rebuild a compacted model from its original config."""
    return {"linear": {name: list(m.weight.shape) for name, m in model.named_modules()
                       if isinstance(m, nn.Linear)},
            "heads": {name: {k: getattr(m, k) for k in ("num_heads", "num_key_value_heads")
                             if hasattr(m, k)}
                      for name, m in model.named_modules() if hasattr(m, "head_dim")}}


@torch.no_grad()
def resize(model: nn.Module, spec: dict):
    """Give a freshly built model the shapes of a compacted one (weights still to be loaded)."""
    for name, (out_f, in_f) in spec["linear"].items():
        layer = model.get_submodule(name)
        if tuple(layer.weight.shape) != (out_f, in_f):
            _keep(layer, rows=torch.arange(out_f), cols=torch.arange(in_f))
    for name, attrs in spec["heads"].items():
        for k, value in attrs.items():
            setattr(model.get_submodule(name), k, value)


# The saved format: a Hugging Face folder whose compact.json holds the shapes, and whose
# config.json names another model_type, so that plain from_pretrained (which would build the
# dense shapes) stops with a message that names the loader.


COMPACT = "compact.json"


def is_compacted(folder) -> bool:
    return os.path.isfile(os.path.join(folder, COMPACT))


def save(model, tokenizer, folder, shapes):
    """save_pretrained, plus compact.json with the shapes (from `compact`) that `load` rebuilds."""
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        config = json.load(f)
    with open(os.path.join(folder, COMPACT), "w") as f:
        json.dump({"model_type": config["model_type"], **shapes}, f)
    config["model_type"] = (f"{config['model_type']}-compacted; load with "
                            "run_opt.load(folder) or compact.load(folder) of llm-surgeon")
    with open(path, "w") as f:
        json.dump(config, f, indent=1)


def load(folder, dtype="auto"):
    """The compacted model of a folder that `save` wrote, in `dtype` (auto: as saved)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM
    with open(os.path.join(folder, COMPACT)) as f:
        spec = json.load(f)
    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    config.pop("model_type")
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(spec["model_type"], **config),
                                             dtype=torch.float32)
    resize(model, spec)
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
    return model.to(next(iter(state.values())).dtype if dtype == "auto" else dtype)

"""GGUF export: a pruned Llama-family model as one file that llama.cpp runs (not the paper).

A model of its original shapes (unstructured, N:M, rows and columns) is written as llama.cpp's
`llama` architecture. A compacted model (compact.py: heads and MLP units cut out, each layer with
widths of its own) is written as llama.cpp's `deci` architecture (the one of NVIDIA's pruned
Nemotron models), which reads each layer's query heads, key-value heads and MLP width from
arrays. Where llama.cpp cannot express a shape, the fewest zeros are added (`padding` in the
report says how many):
- every key-value head of a layer serves the same number of query heads in llama.cpp; uneven
  groups get zero query heads, or a key-value head written twice, whichever adds fewer weights;
- a layer without heads skips attention in `deci`; it gets one zero head where that would drop
  something (layer 0, whose head count sets the head size; an output projection with a bias);
- a layer without MLP units skips the whole layer's output in `deci`, attention included; it
  gets one zero unit unless its attention is gone too.
Query and key rows are permuted from Hugging Face's rotate-half order to llama.cpp's pairs of
neighbouring values, as llama.cpp's own converter does. The tokenizer's metadata follows that
converter: byte-level BPE as `gpt2` with its merges, byte-fallback BPE (Llama 2) as `llama`.

    import gguf_export
    gguf_export.write(model, tokenizer, "pruned.gguf")      # float32; "f16" or "bf16" too
"""
import json
import os
import tempfile
from hashlib import sha256
from pathlib import Path

import numpy as np
import torch

TYPES = ("f32", "f16", "bf16")
FAMILIES = ("llama",)                  # config.model_type (a compacted one: "llama-compacted")
ROPES = ("default", "llama3")

# llama.cpp names a BPE pre-tokenizer by the hash of the tokens of CHECK (its converter's table;
# these are the families that are Llama-shaped)
CHECK = ('\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis '
         'concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 '
         'កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на Български '
         '\'\'\'\'\'\'```````""""......!!!!!!?????? I\'ve been \'told he\'s there, \'RE you sure? '
         '\'M not sure I\'ll make it, \'D you like some tea? We\'Ve a\'lL')
PRE_TOKENIZERS = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
}


def rope_of(config) -> dict:
    return getattr(config, "rope_parameters", None) or {
        "rope_theta": getattr(config, "rope_theta", 10000.0), **(config.rope_scaling or {})}


def check(config):
    """Why a model of this config cannot be written (a sentence), or None."""
    family = config.model_type.removesuffix("-compacted")
    if family not in FAMILIES:
        return (f"--gguf writes Llama-family models (model_type llama: Llama, SmolLM, ...); "
                f"this one is {family}")
    rope = rope_of(config).get("rope_type", "default")
    if rope not in ROPES:
        return f"--gguf writes RoPE of types {', '.join(ROPES)}; this model's is {rope}"
    return None


# --------------------------------------------------------------------------------------------
# Each layer's shapes as llama.cpp takes them


def query_slots(kv_of: list[int], kv: int):
    """Query heads laid out for llama.cpp, where key-value head i serves query slots i*g ..
    (i+1)*g-1: (key-value head written in each place, query head in each slot or None for a
    zero head). Among all g, the one that adds the fewest heads (zero query heads plus key-value
    heads written twice; each is 2 * head_dim * hidden weights); on a tie the larger g."""
    groups = [[h for h, j in enumerate(kv_of) if j == i] for i in range(kv)]
    groups = [(i, g) for i, g in enumerate(groups) if g]
    width = max(len(g) for _, g in groups)

    def added(g):
        places = sum(-(-len(heads) // g) for _, heads in groups)
        return places * g - len(kv_of) + places - kv
    g = min(range(width, 0, -1), key=added)
    places, slots = [], []
    for i, heads in groups:
        for start in range(0, len(heads), g):
            chunk = heads[start:start + g]
            places.append(i)
            slots += chunk + [None] * (g - len(chunk))
    return places, slots


def rows(W, idx, d):
    """(n * d, ...) -> (len(idx) * d, ...): head blocks of W, zeros where idx is None."""
    return torch.cat([W[i * d:(i + 1) * d] if i is not None else W.new_zeros(d, *W.shape[1:])
                      for i in idx]) if idx else W[:0]


def to_pairs(W, n):
    """Rotate-half order to llama.cpp's neighbouring pairs, per head (its converter's permute)."""
    return W.reshape(n, 2, W.shape[0] // n // 2, *W.shape[1:]).swapaxes(1, 2).reshape(W.shape)


def attention_tensors(attn, first: bool):
    """{name: tensor} of one attention block, and its (query heads, key-value heads)."""
    q, k, v = attn.q_proj, attn.k_proj, attn.v_proj
    o = attn.o_proj
    d = attn.head_dim
    heads, kv = q.out_features // d, k.out_features // d
    if heads == 0:
        if not first and o.bias is None:
            return {}, (0, 0)
        places, slots = [None], [None]                  # one zero head
    else:
        kv_of = getattr(attn, "kv_index", None) or [h * kv // heads for h in range(heads)]
        places, slots = query_slots(list(kv_of), kv)
    n, n_kv = len(slots), len(places)
    out = {"attn_q.weight": to_pairs(rows(q.weight, slots, d), n),
           "attn_k.weight": to_pairs(rows(k.weight, places, d), n_kv),
           "attn_v.weight": rows(v.weight, places, d),
           "attn_output.weight": rows(o.weight.T, slots, d).T}
    for name, layer, idx, pairs in (("attn_q", q, slots, n), ("attn_k", k, places, n_kv),
                                    ("attn_v", v, places, None)):
        if layer.bias is not None:
            b = rows(layer.bias, idx, d)
            out[f"{name}.bias"] = to_pairs(b, pairs) if pairs else b
    if o.bias is not None:
        out["attn_output.bias"] = o.bias
    return out, (n, n_kv)


def mlp_tensors(mlp, keep: bool):
    """{name: tensor} of one gated MLP, its width; with `keep`, an empty MLP gets a zero unit."""
    gate, up, down = mlp.gate_proj, mlp.up_proj, mlp.down_proj
    padded = int(keep and gate.out_features == 0)
    if gate.out_features == 0 and not padded:
        return {}, 0, 0
    pad = lambda W: torch.nn.functional.pad(W, (0, 0, 0, padded))   # noqa: E731  zero rows
    out = {"ffn_gate.weight": pad(gate.weight), "ffn_up.weight": pad(up.weight),
           "ffn_down.weight": pad(down.weight.T).T}
    for name, layer in (("ffn_gate", gate), ("ffn_up", up)):
        if layer.bias is not None:
            out[f"{name}.bias"] = torch.nn.functional.pad(layer.bias, (0, padded))
    if down.bias is not None:
        out["ffn_down.bias"] = down.bias
    return out, len(out["ffn_gate.weight"]), padded


def layer_tensors(model):
    """Every layer's tensors under llama.cpp's names, and its (heads, kv heads, MLP width)."""
    blocks = model.model.layers
    tensors, widths = {}, []
    padding = {"query_heads": 0, "kv_heads": 0, "mlp_units": 0}
    for i, block in enumerate(blocks):
        a = block.self_attn
        attn, (n, n_kv) = attention_tensors(a, i == 0)
        padding["query_heads"] += n - a.q_proj.out_features // a.head_dim
        padding["kv_heads"] += n_kv - a.k_proj.out_features // a.head_dim
        down = block.mlp.down_proj
        mlp, ff, units = mlp_tensors(block.mlp, n > 0 or down.bias is not None
                                     or i == len(blocks) - 1)
        padding["mlp_units"] += units
        if n:
            tensors[f"blk.{i}.attn_norm.weight"] = block.input_layernorm.weight
        if ff:
            tensors[f"blk.{i}.ffn_norm.weight"] = block.post_attention_layernorm.weight
        tensors.update({f"blk.{i}.{k}": t for k, t in {**attn, **mlp}.items()})
        widths.append((n, n_kv, ff))
    return tensors, widths, padding


# --------------------------------------------------------------------------------------------
# The tokenizer, as llama.cpp's converter writes it


def tokenizer_metadata(writer, tokenizer, vocab_size: int) -> str:
    """Writes the tokenizer's vocabulary, merges and special tokens; returns the pre-tokenizer
    written ("default" where the tokenizer is none that llama.cpp's table knows)."""
    import gguf
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        with open(os.path.join(folder, "tokenizer.json"), encoding="utf-8") as f:
            model = json.load(f)["model"]
        if model["type"] != "BPE":
            raise ValueError(f"--gguf writes BPE tokenizers; this one is {model['type']}")
        if model.get("byte_fallback"):                      # Llama 2: SentencePiece as BPE
            vocab = gguf.LlamaHfVocab(Path(folder))
            tokens, scores, types = zip(*vocab.all_tokens())
            writer.add_tokenizer_model("llama")
            writer.add_tokenizer_pre(pre := "default")
            writer.add_token_list(list(tokens))
            writer.add_token_scores(list(scores))
            writer.add_token_types(list(types))
            gguf.SpecialVocab(folder, n_vocab=len(tokens)).add_to_gguf(writer)
            return pre
        pre = PRE_TOKENIZERS.get(sha256(str(tokenizer.encode(CHECK)).encode()).hexdigest(),
                                 "default")
        reverse = {i: t for t, i in tokenizer.get_vocab().items()}
        added = tokenizer.added_tokens_decoder
        tokens, types = [], []
        for i in range(vocab_size):
            if i not in reverse:
                tokens.append(f"[PAD{i}]")
                types.append(gguf.TokenType.UNUSED)
            elif i in added:
                tokens.append(reverse[i])
                types.append(gguf.TokenType.CONTROL if added[i].special
                             else gguf.TokenType.USER_DEFINED)
            else:
                tokens.append(reverse[i])
                types.append(gguf.TokenType.NORMAL)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        gguf.SpecialVocab(folder, load_merges=True, n_vocab=vocab_size).add_to_gguf(writer)
        return pre


# --------------------------------------------------------------------------------------------
# The file


def rope_factors(config, d):
    """llama.cpp's rope_freqs of Llama 3's RoPE: what divides each default frequency."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    theta = rope_of(config)["rope_theta"]
    default = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    llama3, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    return (default / llama3.double()).float()


def as_type(t: torch.Tensor, tensor_type: str):
    """(array, raw dtype or None): matrices in the file's type, vectors in float32."""
    import gguf
    x = t.detach().to("cpu", torch.float32).numpy()
    if tensor_type == "f32" or x.ndim == 1:
        return x, None
    if tensor_type == "f16":
        return x.astype(np.float16), None
    return gguf.quants.quantize(x, gguf.GGMLQuantizationType.BF16), \
        gguf.GGMLQuantizationType.BF16


@torch.no_grad()
def write(model, tokenizer, path, tensor_type: str = "f32") -> dict:
    """Writes `model` (a Llama-family causal LM, compacted or not) and its tokenizer to the GGUF
    file `path`. Returns a report: architecture, each layer's widths, the zeros added."""
    import gguf
    config = model.config
    reason = check(config)
    if reason:
        raise ValueError(reason)
    if tensor_type not in TYPES:
        raise ValueError(f"tensor type {tensor_type!r}: one of {', '.join(TYPES)}")
    layers, widths, padding = layer_tensors(model)
    d = model.model.layers[0].self_attn.head_dim
    original = (config.num_attention_heads, config.num_key_value_heads, config.intermediate_size)
    arch = "llama" if all(w == original for w in widths) and not any(padding.values()) \
        else "deci"
    writer = gguf.GGUFWriter(path, arch)
    writer.add_name(os.path.basename(getattr(config, "_name_or_path", "") or "pruned"))
    writer.add_block_count(len(widths))
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    if arch == "llama":
        writer.add_head_count(original[0])
        writer.add_head_count_kv(original[1])
        writer.add_feed_forward_length(original[2])
    else:
        writer.add_head_count([n for n, _, _ in widths])
        writer.add_head_count_kv([n for _, n, _ in widths])
        writer.add_feed_forward_length([f for _, _, f in widths])
    writer.add_key_length(d)
    writer.add_value_length(d)
    writer.add_rope_dimension_count(d)
    writer.add_rope_freq_base(rope_of(config)["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                          "bf16": gguf.LlamaFileType.MOSTLY_BF16}[tensor_type])
    pre = tokenizer_metadata(writer, tokenizer, config.vocab_size)
    tensors = {"token_embd.weight": model.model.embed_tokens.weight,
               "output_norm.weight": model.model.norm.weight}
    if not getattr(config, "tie_word_embeddings", False):
        tensors["output.weight"] = model.lm_head.weight
    if rope_of(config).get("rope_type", "default") == "llama3":
        tensors["rope_freqs.weight"] = rope_factors(config, d)
    tensors.update(layers)
    for name, t in tensors.items():
        array, raw = as_type(t, tensor_type)
        writer.add_tensor(name, array, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"path": str(path), "arch": arch, "type": tensor_type, "tokenizer_pre": pre,
            "params": sum(t.numel() for t in tensors.values()),
            "layers": [{"heads": n, "kv_heads": kv, "mlp": f} for n, kv, f in widths],
            "padding": padding}


def summary(report: dict) -> str:
    """One line about a written file."""
    padding = ", ".join(f"{n} {what.replace('_', ' ')}" for what, n in report["padding"].items()
                        if n)
    return (f"gguf: {report['path']} ({report['arch']}, {report['type']}, "
            f"{report['params'] / 1e6:.2f}M parameters"
            + (f"; zeros added where llama.cpp needs them: {padding}" if padding else "") + ")")

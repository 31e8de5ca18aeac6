"""A 1B-parameter model on a CPU: Llama-3.2-1B's published shapes with random weights, from a
config this script writes itself (no hub), and the memory model's prediction for a run on it.

    python benchmarks/llama1b.py build benchmarks/assets/llama-3.2-1b-shapes   # ~5 GB, float32
    python benchmarks/llama1b.py predict --dtype bfloat16 --structure rowcol --seqlen 512
    OMP_NUM_THREADS=2 python run_opt.py --model benchmarks/assets/llama-3.2-1b-shapes \\
        --dtype bfloat16 --structure rowcol --sparsity 0.1 --shots 1 --nsamples 4 --seqlen 512 \\
        --train-file benchmarks/assets/brown/train.txt --test-file benchmarks/assets/brown/test.txt \\
        --eval-windows 4 --skip-dense-eval --json benchmarks/llama1b/rowcol-bfloat16.json

The shapes: 16 blocks, width 2048, MLP 8192, 32 query and 8 key-value heads of 64, vocabulary
128256, tied embeddings (1.24B parameters). The folder takes SmolLM2's tokenizer from
benchmarks/setup.sh's assets (its ids are all below 128256): the weights are random, so the
perplexity means nothing; the run measures seconds and memory.
"""
import argparse
import json
import os
import resource
import shutil
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

CONFIG = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
              num_attention_heads=32, num_key_value_heads=8, head_dim=64,
              max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=500000.0,
              tie_word_embeddings=True, bos_token_id=128000, eos_token_id=128001)
TOKENIZER = os.path.join(HERE, "assets", "smollm2-135m-instruct")


def config():
    from transformers import LlamaConfig
    return LlamaConfig(**CONFIG)


def build(folder):
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM
    torch.manual_seed(0)
    model = LlamaForCausalLM(config())
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(TOKENIZER).save_pretrained(folder)
    print(f"{folder}: {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters")


def activation_bytes(seqlen, dtype_bytes, cfg=CONFIG):
    """The curvature pass's backward on one window beyond the factors: the logits in the model's
    dtype, their float32 copy and its gradient (3 (L, vocab) arrays); each block's saved
    activations (about 12 widths and 4 MLP widths a token) in the model's dtype; the hooks'
    float32 copies of the largest input and output gradient, and one Gram temporary."""
    L, V, d, f = seqlen, cfg["vocab_size"], cfg["hidden_size"], cfg["intermediate_size"]
    logits = L * V * (dtype_bytes + 8)
    blocks = cfg["num_hidden_layers"] * L * (12 * d + 4 * f) * dtype_bytes
    hooks = 2 * 4 * L * f
    return logits + blocks + hooks


def predict(dtype, structure, seqlen):
    """Bytes of each part: runtime (python, torch, transformers, measured here), model, factors,
    costs, workspace (benchmarks/scaling.py's model), activations (above)."""
    import torch
    from transformers import LlamaForCausalLM
    import scaling
    import surgeon
    runtime = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with torch.device("meta"):
        model = LlamaForCausalLM(config())
    layers = surgeon.prunable_layers(model)
    source = {}                            # q/k/v read one input, gate/up another
    for name in layers:
        kind = name.rsplit(".", 1)[-1]
        block = name.rsplit(".", 2)[0]
        source[name] = {"k_proj": f"{block}.q_proj", "v_proj": f"{block}.q_proj",
                        "up_proj": f"{block}.gate_proj"}.get(kind, name)
    size = torch.empty(0, dtype=getattr(torch, dtype)).element_size()
    parts = {"runtime": runtime,
             "model": sum(p.numel() for p in model.parameters()) * size,
             **scaling.predict(layers, source, structure),
             "activations": activation_bytes(seqlen, size)}
    return parts


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    b = sub.add_parser("build", help="write the config and random float32 weights to a folder")
    b.add_argument("folder")
    q = sub.add_parser("predict", help="the memory model's peak for one shot, in MiB")
    q.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    q.add_argument("--structure", default="rowcol")
    q.add_argument("--seqlen", type=int, default=512)
    args = p.parse_args()
    if args.what == "build":
        if os.path.exists(os.path.join(args.folder, "model.safetensors")) or \
                os.path.exists(os.path.join(args.folder, "model.safetensors.index.json")):
            print(f"{args.folder}: there already")
            return
        tmp = args.folder.rstrip("/") + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        build(tmp)
        os.replace(tmp, args.folder)                # complete or not there at all
        return
    parts = predict(args.dtype, args.structure, args.seqlen)
    mib = {k: round(v / 2**20) for k, v in parts.items()}
    print(json.dumps({"predicted_mb": mib, "predicted_peak_mb": peak(mib)}))


def peak(parts):
    """The activations live during the curvature pass, the costs and the workspace after it:
    the peak is runtime + model + factors + the larger of the two."""
    return parts["runtime"] + parts["model"] + parts["factors"] + max(
        parts["activations"], parts["costs"] + parts["workspace"])


if __name__ == "__main__":
    main()

"""A 1B-parameter model on a CPU: Llama-3.2-1B's published shapes with random weights, from a
config this script writes itself (no hub); scaling.py --against sets a run on it beside the
memory model.

    python benchmarks/llama1b.py benchmarks/assets/llama-3.2-1b-shapes   # ~5 GB, float32
    OMP_NUM_THREADS=2 python run_opt.py --model benchmarks/assets/llama-3.2-1b-shapes \\
        --dtype bfloat16 --structure rowcol --sparsity 0.1 --shots 1 --nsamples 4 --seqlen 512 \\
        --train-file benchmarks/assets/brown/train.txt --test-file benchmarks/assets/brown/test.txt \\
        --eval-windows 4 --skip-dense-eval --json benchmarks/records/llama1b/rowcol-bfloat16.json
    python benchmarks/scaling.py --against benchmarks/records/llama1b/rowcol-bfloat16.json  # the model

The shapes: 16 blocks, width 2048, MLP 8192, 32 query and 8 key-value heads of 64, vocabulary
128256, tied embeddings (1.24B parameters). The folder takes SmolLM2's tokenizer from
benchmarks/setup.sh's assets (its ids are all below 128256): the weights are random, so the
perplexity means nothing; the run measures seconds and memory.
"""
import argparse
import os
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


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("folder", help="where to write the config and random float32 weights")
    args = p.parse_args()
    if os.path.exists(os.path.join(args.folder, "model.safetensors")) or \
            os.path.exists(os.path.join(args.folder, "model.safetensors.index.json")):
        print(f"{args.folder}: there already")
        return
    tmp = args.folder.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    build(tmp)
    os.replace(tmp, args.folder)                    # complete or not there at all


if __name__ == "__main__":
    main()

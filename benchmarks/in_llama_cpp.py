"""The pruned models where people serve them: llama.cpp (through llama-cpp-python, which this
script installs from PyPI where it is missing: it builds from source, 10-20 minutes).

    benchmarks/setup.sh && python benchmarks/in_llama_cpp.py            # builds what is missing
    python benchmarks/in_llama_cpp.py --build-only                      # the pruned models alone

On SmolLM2-135M-Instruct with the grid's protocol (32 calibration windows of 512 tokens of
Brown train, seed 0; the first 64 windows of 512 tokens of Brown test):
  dense                    the model as benchmarks/setup.sh builds it
  surgeon-unstructured-50  LLM Surgeon, 50% unstructured in one shot (a row a chunk)
  surgeon-units-30         LLM Surgeon, heads and MLP units to 30% in 6 shots, compacted (the
                           grid's surgeon-units-30-shots-6)
  surgeon-units-30-pad32   the same model, its MLPs padded with zero units to widths that are
                           multiples of 32 (--compact-multiple 32), which ggml's kernels favour
each pruned by run_opt.py into out/llama-cpp/NAME (record: records/llama-cpp/prune-NAME.json),
then written as one float32 GGUF file by `run_opt.py --model FOLDER --sparsity 0 --gguf FILE`,
which also evaluates PyTorch's perplexity on the same windows (records/llama-cpp/gguf-NAME.json).
llama.cpp then computes each file's perplexity on those token ids (float32 KV cache; each
window from an empty cache, the mean over windows of a window's mean next-token NLL, as
run_opt.py does) and is timed in turns (rounds, each model once a round, in turn order rotated):
prompt processing of one 512-token window (logits of its last token only, as llama-bench
measures it), and greedy generation of 64 tokens after a 64-token prompt, tokens per second, the
medians over rounds. Writes records/llama-cpp/smollm2-brown.json.
"""
import argparse
import json
import math
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
RECORDS = os.path.join(HERE, "records", "llama-cpp")
OUT = "out/llama-cpp"
ASSETS = "benchmarks/assets"
PROTOCOL = ["--nsamples", "32", "--seqlen", "512", "--seed", "0", "--eval-windows", "64",
            "--train-file", f"{ASSETS}/brown/train.txt", "--test-file", f"{ASSETS}/brown/test.txt"]
MODELS = {                      # name: run_opt.py's pruning arguments (None: a folder, below)
    "dense": None,
    "surgeon-unstructured-50": ["--method", "surgeon", "--structure", "unstructured",
                                "--sparsity", "0.5", "--shots", "1", "--max-correlate", "1"],
    "surgeon-units-30": ["--method", "surgeon", "--structure", "units", "--sparsity", "0.3",
                         "--shots", "6", "--damp-g", "0.1", "--lora-steps", "0", "--compact"],
    "surgeon-units-30-pad32": None,
}
CONVERT = {"surgeon-units-30-pad32": ("surgeon-units-30", ["--compact", "--compact-multiple", "32"])}


def folder_of(name):
    if name in CONVERT:
        return folder_of(CONVERT[name][0])
    return f"{ASSETS}/smollm2-135m-instruct" if MODELS[name] is None else f"{OUT}/{name}"


def run_opt(args, record):
    """run_opt.py with `args` from the repository's root, unless its record is there."""
    if os.path.exists(record):
        return
    cmd = [sys.executable, "run_opt.py", *args, "--json", os.path.relpath(record, ROOT)]
    print("$ " + " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)


def build(name):
    """The pruned folder and the GGUF file of one model, where they are missing."""
    os.makedirs(RECORDS, exist_ok=True)
    if MODELS[name] is not None:
        run_opt(["--model", f"{ASSETS}/smollm2-135m-instruct", *PROTOCOL, *MODELS[name],
                 "--skip-dense-eval", "--save", folder_of(name)],
                os.path.join(RECORDS, f"prune-{name}.json"))
    run_opt(["--model", folder_of(name), "--sparsity", "0", "--seqlen", "512", "--eval-windows",
             "64", "--test-file", f"{ASSETS}/brown/test.txt", "--gguf", f"{OUT}/{name}.gguf",
             *CONVERT.get(name, (None, []))[1]],
            os.path.join(RECORDS, f"gguf-{name}.json"))


def ensure_llama_cpp():
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        print("installing llama-cpp-python from PyPI (it builds from source)", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "llama-cpp-python", "diskcache"],
                       check=True)


def test_windows(name):
    """The token ids of run_opt.py's evaluation windows (64 x 512 of Brown test)."""
    import run_opt
    tokenizer, _ = run_opt.load_tokenizer(folder_of(name))
    ids = run_opt.token_ids(tokenizer, f"{ASSETS}/brown/test.txt", "test")
    return [w[0].tolist() for w in run_opt.eval_windows(ids, 512, 64, "Brown test")]


def open_model(name, threads, logits_all):
    import llama_cpp
    return llama_cpp.Llama(os.path.join(ROOT, OUT, f"{name}.gguf"), n_ctx=512, n_batch=512,
                           logits_all=logits_all, n_threads=threads, n_threads_batch=threads,
                           type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32,
                           verbose=False)


def perplexity(llm, windows):
    import numpy as np
    nll = []
    for w in windows:
        llm.reset()
        llm.eval(w)
        logits = np.asarray(llm.scores[:len(w) - 1], dtype=np.float64)
        top = logits.max(1, keepdims=True)
        logp = logits - top - np.log(np.exp(logits - top).sum(1, keepdims=True))
        nll.append(-logp[np.arange(len(w) - 1), w[1:]].mean())
    return math.exp(sum(nll) / len(nll))


def llama_cpp_ppl(name, windows, threads):
    """llama.cpp's perplexity of a file, kept beside it (out/, not in git) until it changes."""
    path, kept = os.path.join(ROOT, OUT, f"{name}.gguf"), os.path.join(ROOT, OUT, f"{name}.ppl")
    if os.path.exists(kept) and os.path.getmtime(kept) > os.path.getmtime(path):
        with open(kept) as f:
            return float(f.read())
    print(f"{name}: llama.cpp perplexity over {len(windows)} windows...", flush=True)
    llm = open_model(name, threads, logits_all=True)
    ppl = perplexity(llm, windows)
    llm.close()
    with open(kept, "w") as f:
        f.write(repr(ppl))
    return ppl


def speeds(llm, window):
    """(prompt tokens per second over the whole window, generated tokens per second)."""
    import numpy as np
    llm.reset()
    tic = time.perf_counter()
    llm.eval(window)
    prompt = len(window) / (time.perf_counter() - tic)
    llm.reset()
    llm.eval(window[:64])
    tic = time.perf_counter()
    for _ in range(64):
        llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])     # the last token's logits
    return prompt, 64 / (time.perf_counter() - tic)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--build-only", action="store_true", help="prune and write the files only")
    p.add_argument("--only", nargs="+", choices=list(MODELS), help="build these only")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="llama.cpp's threads")
    args = p.parse_args()
    for name in args.only or MODELS:
        build(name)
    if args.build_only:
        return
    ensure_llama_cpp()
    import statistics

    import run_opt
    windows = test_windows("dense")
    models = {}
    for name in MODELS:
        with open(os.path.join(RECORDS, f"gguf-{name}.json")) as f:
            rec = json.load(f)
        models[name] = {"name": name, "params": rec["gguf"]["params"],
                        "ppl_torch": rec["ppl_dense"], "ppl_llama_cpp": llama_cpp_ppl(
                            name, windows, args.threads),
                        "arch": rec["gguf"]["arch"], "padding": rec["gguf"]["padding"],
                        "prompt": [], "generate": []}
        print(f"  torch {models[name]['ppl_torch']:.4f}, llama.cpp "
              f"{models[name]['ppl_llama_cpp']:.4f}", flush=True)
    start = run_opt.provenance()
    llms = {name: open_model(name, args.threads, logits_all=False) for name in MODELS}
    names = list(MODELS)
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            prompt, generate = speeds(llms[name], windows[0])
            models[name]["prompt"].append(prompt)
            models[name]["generate"].append(generate)
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(
            f"{n} {models[n]['prompt'][-1]:.0f}/{models[n]['generate'][-1]:.1f}" for n in names),
            flush=True)
    for llm in llms.values():
        llm.close()
    import llama_cpp
    rows = []
    for m in models.values():
        m["prompt_tokens_per_s"] = statistics.median(m["prompt"])
        m["generate_tokens_per_s"] = statistics.median(m["generate"])
        m["prompt_tokens_per_s_rounds"] = m.pop("prompt")
        m["generate_tokens_per_s_rounds"] = m.pop("generate")
        rows.append(m)
    record = {"provenance": {**start, "end_load_average": os.getloadavg(),
                             "llama_cpp_python": llama_cpp.__version__,
                             "threads": args.threads, "rounds": args.rounds,
                             "command": "python benchmarks/in_llama_cpp.py"},
              "protocol": "SmolLM2-135M-Instruct (benchmarks/setup.sh), 64 windows of 512 "
                          "tokens of Brown test; float32 GGUF, float32 KV cache; prompt: one "
                          "512-token window; generate: 64 greedy tokens after 64",
              "models": rows}
    with open(os.path.join(RECORDS, "smollm2-brown.json"), "w") as f:
        json.dump(record, f, indent=1)
    dense = models["dense"]
    for m in rows:
        print(f"{m['name']:24} {m['params'] / 1e6:7.2f}M  ppl torch {m['ppl_torch']:.3f} "
              f"llama.cpp {m['ppl_llama_cpp']:.3f}  prompt {m['prompt_tokens_per_s']:.0f} tok/s "
              f"({m['prompt_tokens_per_s'] / dense['prompt_tokens_per_s']:.2f}x)  generate "
              f"{m['generate_tokens_per_s']:.1f} tok/s "
              f"({m['generate_tokens_per_s'] / dense['generate_tokens_per_s']:.2f}x)")


if __name__ == "__main__":
    main()

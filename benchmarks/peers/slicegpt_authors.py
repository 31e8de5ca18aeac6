"""slicegpt.py against the authors' SliceGPT (microsoft/TransformerCompression) on the same model,
the same calibration windows and the same test windows: both perplexities in one record.

    git clone https://github.com/microsoft/TransformerCompression /tmp/tc
    python -m venv --system-site-packages /tmp/tc-venv
    /tmp/tc-venv/bin/pip install transformers==4.41.0 datasets==2.18.0 ml-collections
    python benchmarks/peers/slicegpt_authors.py --authors /tmp/tc --python /tmp/tc-venv/bin/python \\
        --slicing 0.05 --model DIR --train-file TRAIN --test-file TEST --nsamples 8 --seqlen 512 \\
        --eval-windows 16 --json OUT.json

This process slices with slicegpt.py; a second one, with the authors' package and the transformers
release it pins, slices the same windows with theirs (Llama-family models): layer norms fused,
rotate_and_slice with a constant width, head not sliced (their defaults). Their fusion subtracts
each embedding's mean, which RMSNorm does not ignore, so their fused model is not the dense one;
the record has their perplexity as is and with that subtraction undone.
"""
import argparse
import json
import math
import os
import subprocess
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def nll_perplexity(model, windows):
    """exp of the mean over windows of each window's mean next-token NLL (as run_opt.py)."""
    nll = []
    with torch.no_grad():
        for ids in windows:
            logits = model(input_ids=ids).logits[:, :-1].double()
            nll.append(torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()))
    return math.exp(torch.stack(nll).mean().item())


def authors(src, model_dir, windows_file, width, out):
    """In the authors' environment: their fusion and rotate_and_slice on the saved windows."""
    sys.path.insert(0, os.path.join(src, "src"))
    from slicegpt import layernorm_fusion, rotate
    from slicegpt.adapters.llama_adapter import LlamaModelAdapter
    from slicegpt.slicing_scheduler import ConstSlicingScheduler
    from transformers import LlamaForCausalLM
    with open(os.path.join(model_dir, "config.json")) as f:
        config = json.load(f)
    rope = config.get("rope_parameters", {})              # newer configs nest rope_theta
    extra = {"rope_theta": rope["rope_theta"]} if "rope_theta" in rope else {}
    windows = torch.load(windows_file)
    result = {}
    for centered in (True, False):
        model = LlamaForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32,
                                                 **extra).eval()
        adapter = LlamaModelAdapter(model)
        if centered:
            result["dense"] = nll_perplexity(model, windows["test"])
        layernorm_fusion.replace_layers(adapter)
        kept = [W.weight.data.clone() for W in adapter.get_embeddings()]
        layernorm_fusion.fuse_modules(adapter)
        if not centered:
            for W, k in zip(adapter.get_embeddings(), kept):
                W.weight.data = k
        key = "centered" if centered else "uncentered"
        result[f"fused_{key}"] = nll_perplexity(model, windows["test"])
        loader = [{"input_ids": c, "attention_mask": torch.ones_like(c)} for c in windows["calib"]]
        rotate.rotate_and_slice(adapter, loader, ConstSlicingScheduler(width),
                                final_orientation="pca")
        result[f"sliced_{key}"] = nll_perplexity(model, windows["test"])
    with open(out, "w") as f:
        json.dump(result, f)


def main():
    sys.path.insert(0, ROOT)             # this project's modules (not in the authors' process)
    import command
    import run_opt
    from benchmarks.peers import slicegpt
    from benchmarks.peers.sparsegpt_wanda import add_data_flags
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--authors", required=True, help="a checkout of microsoft/TransformerCompression")
    p.add_argument("--python", required=True, help="a Python with their pinned transformers")
    p.add_argument("--slicing", type=command.fraction, required=True)
    add_data_flags(p)
    args = p.parse_args()
    torch.manual_seed(0)
    record = run_opt.new_record(args, "cpu")
    model, tokenizer = run_opt.load(args.model)
    calib = run_opt.calibration_windows(run_opt.token_ids(tokenizer, args.train_file, "train"),
                                        args.nsamples, args.seqlen, args.seed, args.train_file)
    test = run_opt.eval_windows(run_opt.token_ids(tokenizer, args.test_file, "test"), args.seqlen,
                                args.eval_windows, args.test_file)
    model.eval()
    width = slicegpt.width_for(model, args.slicing)
    record["ppl_dense"] = nll_perplexity(model, test)
    slicegpt.slice_model(model, calib, width)
    record.update(width=width, ppl_here=nll_perplexity(model, test))
    with tempfile.TemporaryDirectory() as tmp:
        torch.save({"calib": calib, "test": test}, os.path.join(tmp, "windows.pt"))
        subprocess.run([args.python, os.path.abspath(__file__), "--in-authors-env", args.authors,
                        args.model, os.path.join(tmp, "windows.pt"), str(width),
                        os.path.join(tmp, "theirs.json")], check=True)
        with open(os.path.join(tmp, "theirs.json")) as f:
            record["authors"] = json.load(f)
    print(f"width {width}: here {record['ppl_here']:.6f}; the authors' "
          f"{record['authors']['sliced_uncentered']:.6f} with the embeddings' mean subtraction "
          f"undone, {record['authors']['sliced_centered']:.6f} as is (dense "
          f"{record['ppl_dense']:.4f}; their fused model {record['authors']['fused_centered']:.4f})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--in-authors-env":
        src, model_dir, windows_file, width, out = sys.argv[2:7]
        authors(src, model_dir, windows_file, int(width), out)
    else:
        main()

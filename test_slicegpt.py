"""Tests for benchmarks/peers/slicegpt.py (SliceGPT, the structured peer) on tiny random OPT and Llama
models with random norm scales and shifts: the rotated model computes the dense function, the
slice keeps the leading principal directions, the sliced model saves and loads. Nothing is
downloaded."""
import pytest
import torch

from benchmarks.peers import slicegpt
from conftest import args_for, calib, make_files, tiny_llama, tiny_opt


def with_random_norms(model, seed=0):
    """Norm scales and shifts away from their 1 and 0 at init, so that folding them is tested."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if "Norm" in type(module).__name__:
                module.weight.copy_(1 + 0.3 * torch.randn(module.weight.shape, generator=gen))
                if getattr(module, "bias", None) is not None:
                    module.bias.copy_(0.3 * torch.randn(module.bias.shape, generator=gen))
    return model


def tied_llama():
    model = tiny_llama()
    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.model.embed_tokens.weight
    return model


MODELS = {"opt": tiny_opt, "llama": tiny_llama, "tied llama": tied_llama}


@torch.no_grad()
def logits(model, ids):
    return model(ids).logits.double()


@pytest.mark.parametrize("kind", list(MODELS))
def test_rotated_unsliced_model_computes_the_dense_function(kind):
    """Computational invariance (Sec. 3.1-3.2): norms folded, every stream rotated, nothing
    sliced: the dense logits to 1e-5."""
    model = with_random_norms(MODELS[kind]())
    ids = calib(n=1, seed=7)[0]
    dense = logits(model, ids)
    arch = slicegpt.make_invariant(model)
    assert torch.allclose(logits(model, ids), dense, atol=1e-5, rtol=0)
    slicegpt.rotate_and_slice(model, arch, calib(), model.config.hidden_size)
    assert all(block.attn_shortcut is not None for block in arch.blocks)
    assert torch.allclose(logits(model, ids), dense, atol=1e-5, rtol=0)
    if kind == "tied llama":                           # untied: the head is rotated alone
        assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()


@pytest.mark.parametrize("kind", ["opt", "llama"])
def test_slicing_keeps_the_leading_principal_directions(kind):
    """The embeddings' outputs over the calibration tokens, in the kept coordinates: their second
    moment is diagonal and holds the largest eigenvalues of the unsliced one, largest first."""
    model = with_random_norms(MODELS[kind]())
    arch = slicegpt.make_invariant(model)
    from benchmarks.peers.sparsegpt_wanda import block_inputs
    before = [args[0].double() for args, _ in block_inputs(model, arch.blocks, calib())]
    values = torch.linalg.eigvalsh(sum(x.reshape(-1, 16).T @ x.reshape(-1, 16) for x in before))
    seen = slicegpt.rotate_and_slice(model, arch, calib(), 8)
    assert torch.allclose(seen[0], values.flip(0), rtol=1e-9, atol=1e-9)
    after = [args[0].double() for args, _ in block_inputs(model, arch.blocks, calib())]
    C = sum(x.reshape(-1, 8).T @ x.reshape(-1, 8) for x in after)
    assert torch.allclose(C, torch.diag(values.flip(0)[:8]), atol=1e-4 * values.max())
    assert model.get_input_embeddings().weight.shape[1] == 8
    assert torch.isfinite(logits(model, calib()[0])).all()


@pytest.mark.parametrize("kind", ["opt", "llama"])
def test_sliced_model_saves_and_loads(kind, tmp_path):
    from transformers import AutoTokenizer
    files = make_files(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(files / "opt")
    model = with_random_norms(MODELS[kind]())
    slicegpt.slice_model(model, calib(), 8)
    ids = calib()[0]
    slicegpt.save(model, tokenizer, tmp_path / "sliced")
    again = slicegpt.load(tmp_path / "sliced")
    assert torch.equal(logits(again, ids), logits(model, ids))
    assert sum(p.numel() for p in again.parameters()) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("kind", list(MODELS))
def test_counts_match_the_sliced_model(kind):
    """block_weights and model_params, computed before slicing, are the sliced model's counts;
    the head reads all D directions (the last block writes D, its MLP shortcut is (d', D))."""
    model = with_random_norms(MODELS[kind]())
    D = model.config.hidden_size
    arch = slicegpt.make_invariant(model)
    blocks, params = slicegpt.block_weights(model, 8), slicegpt.model_params(arch, 8)
    slicegpt.slice_model(model, calib(), 8, arch=arch)
    linear = sum(layer.weight.numel() for block in arch.blocks
                 for layer in [*sum(arch.readers(block), []), *arch.writers(block)])
    shortcuts = sum(S.numel() for block in arch.blocks for S in (block.attn_shortcut,
                                                                   block.mlp_shortcut))
    assert blocks == linear + shortcuts
    assert params == sum(p.numel() for p in model.parameters())
    assert model.get_output_embeddings().weight.shape[1] == D
    assert arch.blocks[-1].mlp_shortcut.shape == (8, D)
    assert arch.blocks[0].mlp_shortcut.shape == (8, 8)


def test_width_for_a_parameter_count():
    model = tiny_llama(hidden=64)
    arch = slicegpt.make_invariant(model)

    def count(d):
        return slicegpt.model_params(arch, d)
    for params in (count(64) - 1, count(40)):
        d = slicegpt.width_for_params(arch, params)
        assert count(d) <= params < count(d + 8)


def test_width_for_a_removal_counts_the_shortcut_matrices():
    model = tiny_llama(hidden=64)
    dense = slicegpt.block_weights(model)
    for removed in (0.1, 0.2, 0.3):
        d = slicegpt.slicing_for_removal(model, removed)
        assert slicegpt.block_weights(model, d) <= (1 - removed) * dense
        assert d == 64 or slicegpt.block_weights(model, d + 8) > (1 - removed) * dense
    # the shortcut matrices are weights kept: slicing 1/8 of the width keeps more than 7/8
    assert slicegpt.block_weights(model, 56) > dense * 56 / 64


@pytest.mark.parametrize("flag", ["--remove", "--match-rowcol"])
def test_command_line_writes_a_record(flag, tmp_path):
    files = make_files(tmp_path)
    record = slicegpt.main([flag, "0.2", "--model", str(files / "llama"), "--train-file",
                            str(files / "train.txt"), "--test-file", str(files / "test.txt"),
                            "--nsamples", "2", "--seqlen", "16", "--eval-windows", "2",
                            "--device", "cpu", "--json", str(tmp_path / "r.json"),
                            "--compact-latency", "--save", str(tmp_path / "sliced")])
    assert (tmp_path / "r.json").exists() and record["ppl_pruned"] > 0
    assert record["width"] < record["hidden_size"]
    if flag == "--remove":
        assert record["sparsity"] >= 0.2 and record["params_compact"] < record["params_dense"]
    else:                      # the whole model within the dense count less 20% of the blocks'
        assert record["params_compact"] <= record["params_dense"] - \
            0.2 * record["blocks_weights_dense"]
    assert "latency_ms_compact" in record
    assert torch.isfinite(logits(slicegpt.load(tmp_path / "sliced"), calib()[0])).all()


def test_latency_compares_saved_models(tmp_path):
    """benchmarks/latency.py loads a Hugging Face folder, a compacted LLM Surgeon folder and a
    sliced one, and scores each as the run that saved it did."""
    import json
    from benchmarks import latency
    import run_opt
    files = make_files(tmp_path)
    sliced = slicegpt.main(["--remove", "0.2", "--model", str(files / "llama"), "--train-file",
                            str(files / "train.txt"), "--test-file", str(files / "test.txt"),
                            "--nsamples", "4", "--seqlen", "32", "--eval-windows", "4",
                            "--device", "cpu", "--save", str(tmp_path / "sliced")])
    pruned = run_opt.main(args_for(files, "llama", "--structure", "rowcol", "--sparsity", "0.4",
                                   "--lora-steps", "0", "--compact",
                                   "--save", str(tmp_path / "surgeon")))
    latency.main(["--test-file", str(files / "test.txt"), "--seqlen", "32", "--eval-windows", "4",
                  "--rounds", "2", "--json", str(tmp_path / "l.json"), f"dense={files / 'llama'}",
                  f"surgeon={tmp_path / 'surgeon'}", f"sliced={tmp_path / 'sliced'}"])
    record = json.loads((tmp_path / "l.json").read_text())
    assert record["dense"]["ppl"] == pytest.approx(pruned["ppl_dense"], rel=1e-6)
    assert record["surgeon"]["ppl"] == pytest.approx(pruned["ppl_compact"], rel=1e-6)
    assert record["sliced"]["ppl"] == pytest.approx(sliced["ppl_pruned"], rel=1e-6)
    assert record["surgeon"]["params"] == pruned["params_compact"]
    assert record["sliced"]["params"] == sliced["params_compact"]
    assert all(len(record[n]["times_ms"]) == 2 and record[n]["latency_ms"] > 0
               for n in ("dense", "surgeon", "sliced"))
    for n in ("dense", "surgeon", "sliced"):       # the rounds' own ratios, their median between
        ratios = sorted(d / t for d, t in zip(record["dense"]["times_ms"], record[n]["times_ms"]))
        assert record[n]["speedup"] == pytest.approx(sum(ratios) / 2)      # ... two rounds
        assert ratios[0] <= record[n]["speedup_quartiles"][0] <= record[n]["speedup"] \
            <= record[n]["speedup_quartiles"][1] <= ratios[1]
    assert record["dense"]["speedup"] == 1.0

"""Where a pruned model goes: GGUF files for llama.cpp (read back, and run by a plain
re-implementation of llama.cpp's llama and deci graphs), and zero-shot accuracy through
lm-evaluation-harness on a local task (counted by hand)."""
import json

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import compact
import gguf_export
import run_opt
import units
from conftest import WORDS, args_for, make_files

gguf = pytest.importorskip("gguf")


def bpe_tokenizer(vocab=300):
    """A byte-level BPE tokenizer trained on WORDS (as GPT-2's and Llama 3's are built)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([" ".join(WORDS)] * 4, trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def llama(layers=4, heads=4, kv_heads=2, vocab=300, tie=False, seed=0, **config):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=64,
        tie_word_embeddings=tie, rope_theta=500.0, **config)).eval()


# ---------------------------------------------------------------------------------------------
# What llama.cpp computes from a file, written from its llama and deci graphs: RMS norms, RoPE
# on neighbouring pairs, query head h reading key-value head h // (heads / kv heads), a layer
# without heads passing its input to the MLP, a layer without MLP ending there (its attention's
# output dropped). Float64; shares no code with gguf_export.


def read(path):
    reader = gguf.GGUFReader(path)
    fields = {name: f.contents() for name, f in reader.fields.items()}
    tensors = {t.name: torch.from_numpy(np.array(t.data, dtype=np.float32)
                                        if t.tensor_type != gguf.GGMLQuantizationType.BF16
                                        else gguf.quants.dequantize(t.data, t.tensor_type))
               .double().reshape([int(n) for n in reversed(t.shape)]) for t in reader.tensors}
    return fields, tensors


def per_layer(value, n):
    return list(value) if isinstance(value, list) else [value] * n


def llama_cpp_logits(path, ids):
    fields, T = read(path)
    arch = fields["general.architecture"]
    n_layer = fields[f"{arch}.block_count"]
    heads = per_layer(fields[f"{arch}.attention.head_count"], n_layer)
    kv_heads = per_layer(fields[f"{arch}.attention.head_count_kv"], n_layer)
    ffn = per_layer(fields[f"{arch}.feed_forward_length"], n_layer)
    d, eps = fields[f"{arch}.attention.key_length"], fields[f"{arch}.attention.layer_norm_rms_epsilon"]
    theta = fields[f"{arch}.rope.freq_base"]

    def norm(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w

    def lin(x, name):
        y = x @ T[f"{name}.weight"].T
        return y + T[f"{name}.bias"] if f"{name}.bias" in T else y

    def rope(x):                                   # (L, n, d), pairs (2i, 2i + 1)
        pos = torch.arange(len(x), dtype=torch.float64)[:, None]
        angle = pos * theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)   # (L, d/2)
        c, s = angle.cos()[:, None], angle.sin()[:, None]
        a, b = x[..., 0::2], x[..., 1::2]
        return torch.stack([a * c - b * s, a * s + b * c], -1).flatten(-2)

    x = T["token_embd.weight"][ids]                                          # (L, hidden)
    L = len(ids)
    for i in range(n_layer):
        n, n_kv, ff, blk = heads[i], kv_heads[i], ffn[i], f"blk.{i}"
        if n:
            h = norm(x, T[f"{blk}.attn_norm.weight"])
            q = rope(lin(h, f"{blk}.attn_q").reshape(L, n, d))
            k = rope(lin(h, f"{blk}.attn_k").reshape(L, n_kv, d))
            v = lin(h, f"{blk}.attn_v").reshape(L, n_kv, d)
            kv_of = torch.arange(n) // (n // n_kv)
            scores = torch.einsum("qhd,khd->hqk", q, k[:, kv_of]) / d ** 0.5
            scores = scores.masked_fill(torch.ones(L, L).triu(1).bool(), float("-inf"))
            att = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v[:, kv_of]).reshape(L, n * d)
            ffn_in = lin(att, f"{blk}.attn_output") + x
        else:
            ffn_in = x
        if ff == 0:
            continue
        h = norm(ffn_in, T[f"{blk}.ffn_norm.weight"])
        gate = lin(h, f"{blk}.ffn_gate")
        x = lin(gate * torch.sigmoid(gate) * lin(h, f"{blk}.ffn_up"), f"{blk}.ffn_down") + ffn_in
    out = T.get("output.weight", T["token_embd.weight"])
    return norm(x, T["output_norm.weight"]) @ out.T


def hf_logits(model, ids):
    with torch.no_grad():
        return model(ids[None]).logits[0].double()


# ---------------------------------------------------------------------------------------------
# GGUF


def test_query_slots_add_the_fewest_heads():
    # groups of 3, 3, 2 query heads: one zero head, every key-value head serving 3
    assert gguf_export.query_slots([0, 0, 0, 1, 1, 1, 2, 2], 3) == (
        [0, 1, 2], [0, 1, 2, 3, 4, 5, 6, 7, None])
    # 3, 1, 1: one query head per key-value head, the first written three times (2 added), not
    # two zero heads in each of the others (4 added)
    assert gguf_export.query_slots([0, 0, 0, 1, 2], 3) == ([0, 0, 0, 1, 2], [0, 1, 2, 3, 4])
    # a key-value head that serves no query head is not written
    assert gguf_export.query_slots([0, 0, 2, 2], 3) == ([0, 2], [0, 1, 2, 3])


def test_a_dense_model_is_llamas_architecture_and_reads_back_equal(tmp_path):
    model, tok = llama(), bpe_tokenizer()
    report = gguf_export.write(model, tok, tmp_path / "m.gguf")
    fields, T = read(tmp_path / "m.gguf")
    assert report["arch"] == fields["general.architecture"] == "llama"
    assert (fields["llama.attention.head_count"], fields["llama.attention.head_count_kv"],
            fields["llama.feed_forward_length"]) == (4, 2, 48)
    attn, d = model.model.layers[1].self_attn, 8
    undo = lambda W, n: W.reshape(n, d // 2, 2, -1).swapaxes(1, 2).reshape(W.shape)  # noqa: E731
    assert torch.equal(undo(T["blk.1.attn_q.weight"], 4), attn.q_proj.weight.double())
    assert torch.equal(undo(T["blk.1.attn_k.weight"], 2), attn.k_proj.weight.double())
    assert torch.equal(T["blk.1.attn_v.weight"], attn.v_proj.weight.double())
    assert torch.equal(T["blk.1.ffn_down.weight"], model.model.layers[1].mlp.down_proj.weight
                       .double())
    assert torch.equal(T["output.weight"], model.lm_head.weight.double())
    assert fields["tokenizer.ggml.model"] == "gpt2" and len(fields["tokenizer.ggml.tokens"]) == 300
    assert fields["tokenizer.ggml.eos_token_id"] == tok.eos_token_id
    assert len(fields["tokenizer.ggml.merges"]) > 0
    assert report["params"] == sum(p.numel() for p in model.parameters())
    ids = torch.randint(0, 300, (12,))
    assert torch.allclose(llama_cpp_logits(tmp_path / "m.gguf", ids), hf_logits(model, ids),
                          atol=1e-4)


def cut(model):
    """Heads and MLP units removed as units pruning leaves them, then compacted: block 0 loses
    every head, block 1 query head 0 (uneven groups: 1 and 2), block 2 every MLP unit, block 3
    5 MLP units, block 4 (the last) both heads of key-value head 0 and every MLP unit."""
    b, d = model.model.layers, 8
    with torch.no_grad():
        b[0].self_attn.o_proj.weight.zero_()
        b[1].self_attn.o_proj.weight[:, :d] = 0
        b[2].mlp.down_proj.weight.zero_()
        b[3].mlp.down_proj.weight[:, :5] = 0
        b[4].self_attn.o_proj.weight[:, :2 * d] = 0
        b[4].mlp.down_proj.weight.zero_()
    ids = torch.randint(0, 300, (12,))
    before = hf_logits(model, ids)
    report = compact.compact(model)
    assert torch.allclose(hf_logits(model, ids), before, atol=1e-6)
    return ids, report


def test_a_compacted_model_is_deci_with_each_layers_widths_and_computes_the_same(tmp_path):
    model = llama(layers=5)
    ids, _ = cut(model)
    report = gguf_export.write(model, bpe_tokenizer(), tmp_path / "m.gguf")
    fields, T = read(tmp_path / "m.gguf")
    assert report["arch"] == fields["general.architecture"] == "deci"
    # block 0: one zero head (its head count sets llama.cpp's head size); 1: 3 query heads in
    # 2 key-value groups of 1 and 2 -> 4 slots; 2: its MLP emptied, one zero unit (else deci
    # drops the layer's attention); 3: 43 units; 4: 2 heads, no MLP, the last: one zero unit
    assert fields["deci.attention.head_count"] == [1, 4, 4, 4, 2]
    assert fields["deci.attention.head_count_kv"] == [1, 2, 2, 2, 1]
    assert fields["deci.feed_forward_length"] == [48, 48, 1, 43, 1]
    assert report["padding"] == {"query_heads": 2, "kv_heads": 1, "mlp_units": 2}
    assert not T["blk.0.attn_q.weight"].any() and not T["blk.2.ffn_down.weight"].any()
    assert torch.allclose(llama_cpp_logits(tmp_path / "m.gguf", ids), hf_logits(model, ids),
                          atol=1e-4)


def test_a_layer_without_heads_or_mlp_is_written_without_them(tmp_path):
    model = llama(layers=3, tie=True)
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight.zero_()
        model.model.layers[1].mlp.down_proj.weight.zero_()
    ids = torch.randint(0, 300, (12,))
    compact.compact(model)
    gguf_export.write(model, bpe_tokenizer(), tmp_path / "m.gguf")
    fields, T = read(tmp_path / "m.gguf")
    assert fields["deci.attention.head_count"] == [4, 0, 4]
    assert fields["deci.feed_forward_length"] == [48, 0, 48]
    assert not any(name.startswith("blk.1.") for name in T) and "output.weight" not in T
    assert torch.allclose(llama_cpp_logits(tmp_path / "m.gguf", ids), hf_logits(model, ids),
                          atol=1e-4)


@pytest.mark.parametrize("kind,dtype", [("f16", torch.float16), ("bf16", torch.bfloat16)])
def test_half_types_hold_the_rounded_matrices_and_float32_vectors(tmp_path, kind, dtype):
    model = llama(layers=1)
    gguf_export.write(model, bpe_tokenizer(), tmp_path / "m.gguf", kind)
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.ffn_up.weight"] == kind.upper() and types["output_norm.weight"] == "F32"
    _, T = read(tmp_path / "m.gguf")
    assert torch.equal(T["blk.0.ffn_up.weight"],
                       model.model.layers[0].mlp.up_proj.weight.to(dtype).double())


def test_llama3_rope_writes_its_frequency_factors(tmp_path):
    model = llama(layers=1, rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                          "original_max_position_embeddings": 64})
    gguf_export.write(model, bpe_tokenizer(), tmp_path / "m.gguf")
    _, T = read(tmp_path / "m.gguf")
    expected = []                          # Llama 3's rule, as llama.cpp's converter states it
    for i in range(4):
        wavelength = 2 * np.pi * 500.0 ** (2 * i / 8)
        if wavelength < 64 / 4:
            expected.append(1.0)
        elif wavelength > 64 / 1:
            expected.append(8.0)
        else:
            smooth = (64 / wavelength - 1) / (4 - 1)
            expected.append(1 / ((1 - smooth) / 8 + smooth))
    assert torch.allclose(T["rope_freqs.weight"], torch.tensor(expected, dtype=torch.float64),
                          rtol=1e-6)
    assert len(set(expected)) > 2                         # every case of the rule is checked


def bpe_folder(root):
    """A tiny Llama with a BPE tokenizer, and the text of make_files."""
    files = make_files(root)
    model, tok = llama(), bpe_tokenizer()
    model.save_pretrained(files / "bpe")
    tok.save_pretrained(files / "bpe")
    return files


def test_command_line_writes_the_compacted_units_model(tmp_path, capsys):
    files = bpe_folder(tmp_path / "files")
    out = tmp_path / "m.gguf"
    record = run_opt.main(args_for(files, "bpe", "--structure", "units", "--sparsity", "0.3",
                                   "--compact", "--gguf", str(out), "--gguf-type", "f32"))
    assert f"gguf: {out} (deci, f32" in capsys.readouterr().out
    fields, _ = read(out)
    layers = record["gguf"]["layers"]
    assert fields["deci.feed_forward_length"] == [x["mlp"] for x in layers]
    assert fields["deci.attention.head_count"] == [x["heads"] for x in layers]
    assert record["gguf"]["params"] >= record["params_compact"]
    assert "gguf" in record["seconds"]


@pytest.mark.parametrize("extra,message", [
    (["--gguf", "{tmp}/m.gguf"], "--gguf writes Llama-family models (model_type llama: Llama, "
                                 "SmolLM, ...); this one is opt"),
    (["--gguf-type", "f16"], "--gguf-type does nothing with no --gguf: it is for --gguf FILE"),
    (["--gguf", "{tmp}/nowhere/m.gguf"], "--gguf {tmp}/nowhere/m.gguf cannot be written"),
    (["--task-dir", "{tmp}"], "--task-dir does nothing with no --tasks: it is for --tasks"),
    (["--tasks", "no_such_task_here"], "--tasks: unknown task no_such_task_here"),
])
def test_export_and_task_flags_are_checked_before_loading(tmp_path, capsys, monkeypatch, extra,
                                                          message):
    files = make_files(tmp_path / "files")
    monkeypatch.setattr(run_opt, "load_model", lambda *a, **k: pytest.fail("loaded"))
    with pytest.raises(SystemExit) as exit:
        run_opt.main(args_for(files, "opt", *[e.format(tmp=tmp_path) for e in extra]))
    err = capsys.readouterr().err.strip().splitlines()
    assert exit.value.code == 2 and len(err) == 1 and message.format(tmp=tmp_path) in err[0], err


def test_a_task_whose_data_is_not_cached_is_refused_offline(tmp_path, capsys, monkeypatch):
    pytest.importorskip("lm_eval")
    import command
    files = make_files(tmp_path / "files")
    monkeypatch.setattr(command, "hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setattr(run_opt, "load_model", lambda *a, **k: pytest.fail("loaded"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "empty-cache"))
    import datasets
    from huggingface_hub import constants
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):      # offline() sets them: restored
        monkeypatch.setenv(var, "")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", constants.HF_HUB_OFFLINE)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", datasets.config.HF_DATASETS_OFFLINE)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit:
        run_opt.main(args_for(files, "opt", "--tasks", "piqa"))
    err = capsys.readouterr().err.strip().splitlines()
    assert exit.value.code == 2 and len(err) == 1, err
    assert "--tasks piqa: its data could not be loaded (the hub cannot be reached" in err[0]


def test_llama_cpp_itself_runs_the_compacted_file(tmp_path):
    """Where llama-cpp-python is installed (benchmarks/in_llama_cpp.py installs it; CI does not)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    model = llama(layers=5)
    ids, _ = cut(model)
    gguf_export.write(model, bpe_tokenizer(), tmp_path / "m.gguf")
    llm = llama_cpp.Llama(str(tmp_path / "m.gguf"), n_ctx=32, logits_all=True, verbose=False,
                          type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    llm.eval(ids.tolist())
    got = torch.tensor(np.array(llm.scores[:len(ids)]), dtype=torch.float64)
    llm.close()
    assert torch.allclose(got, hf_logits(model, ids), atol=1e-3)


# ---------------------------------------------------------------------------------------------
# Zero-shot accuracy


DOCS = [{"question": "the of and", "choices": ["to a", "in is", "that"], "answer": 1},
        {"question": "it was for", "choices": ["on are", "as"], "answer": 0},
        {"question": "with his they", "choices": ["at be this", "from", "have or by"], "answer": 2},
        {"question": "one had not", "choices": ["but", "what all"], "answer": 0},
        {"question": "when we there", "choices": ["can an", "your", "which their"], "answer": 1}]


def local_task(folder):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tiny.jsonl").write_text("\n".join(json.dumps(d) for d in DOCS))
    (folder / "tiny.yaml").write_text(f"""task: tiny_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder / 'tiny.jsonl'}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
""")
    return folder


def accuracy_by_hand(model, tokenizer):
    """The share of questions whose answer has the highest log-likelihood as a continuation
    (" " + choice after the question, no BOS), summed over its tokens."""
    right = 0
    for doc in DOCS:
        scores = []
        for choice in doc["choices"]:
            context = tokenizer(doc["question"], add_special_tokens=False).input_ids
            both = tokenizer(doc["question"] + " " + choice, add_special_tokens=False).input_ids
            with torch.no_grad():
                logp = model(torch.tensor([both])).logits[0].log_softmax(-1)
            scores.append(sum(float(logp[t - 1, both[t]]) for t in range(len(context), len(both))))
        right += int(np.argmax(scores)) == doc["answer"]
    return right / len(DOCS)


def test_zero_shot_accuracy_of_a_local_task_is_the_count_by_hand(tmp_path):
    pytest.importorskip("lm_eval")
    import zeroshot
    from transformers import AutoModelForCausalLM, AutoTokenizer
    files = make_files(tmp_path / "files")
    tasks = local_task(tmp_path / "tasks")
    assert zeroshot.check(["tiny_choice"], str(tasks), offline=True) is None
    for seed in (0, 1, 2):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_pretrained(files / "llama").eval()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        tokenizer = AutoTokenizer.from_pretrained(files / "llama")
        got = zeroshot.evaluate(model, tokenizer, ["tiny_choice"], str(tasks))
        assert got["tiny_choice"]["acc"] == accuracy_by_hand(model, tokenizer)


def test_command_line_reports_dense_and_pruned_accuracy(tmp_path, capsys):
    pytest.importorskip("lm_eval")
    files = make_files(tmp_path / "files")
    tasks = local_task(tmp_path / "tasks")
    record = run_opt.main(args_for(files, "llama", "--sparsity", "0.5", "--structure",
                                   "unstructured", "--tasks", "tiny_choice", "--task-dir",
                                   str(tasks)))
    out = capsys.readouterr().out
    assert "zero-shot accuracy, dense: tiny_choice" in out
    assert "zero-shot accuracy, pruned: tiny_choice" in out
    for which in ("tasks_dense", "tasks_pruned"):
        assert 0 <= record[which]["tiny_choice"]["acc"] <= 1
    model, tokenizer = run_opt.load(str(files / "llama"))
    assert record["tasks_dense"]["tiny_choice"]["acc"] == accuracy_by_hand(model, tokenizer)

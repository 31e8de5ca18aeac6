"""End-to-end tests of run_opt.py on tiny random OPT and Llama models with a word-level tokenizer,
all written to a temp folder: no downloads."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import command
import run_opt
import surgeon
from conftest import args_for, make_files


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return make_files(tmp_path_factory.mktemp("run_opt"))


@pytest.mark.parametrize("model,structure,sparsity", [
    ("opt", "rowcol", "0.3"), ("llama", "rowcol", "0.2"), ("opt", "unstructured", "0.5"),
    ("llama", "2:4", "0.5"), ("llama", "unstructured", "0.4"), ("opt", "4:8", "0.5"),
    ("llama", "1:4", "0.2")])
def test_end_to_end(files, tmp_path, capsys, model, structure, sparsity):
    out, saved = tmp_path / "record.json", tmp_path / "pruned"
    record = run_opt.main(args_for(files, model, "--structure", structure, "--sparsity", sparsity,
                                   "--eval-every", "1", "--json", str(out), "--save", str(saved)))
    printed = capsys.readouterr().out
    assert "dense perplexity:" in printed and "-> pruned" in printed
    assert "sparsity per layer" in printed
    on_disk = json.loads(out.read_text())
    for key in ("ppl_dense", "ppl_pruned", "sparsity", "layers", "seconds", "peak_memory_mb",
                "settings", "versions", "shots"):
        assert key in on_disk, key
    assert on_disk["settings"]["structure"] == structure
    assert on_disk["settings"]["lora_steps"] == (3 if structure == "rowcol" else 0)   # defaults
    assert ("lora" in on_disk["shots"][0]["seconds"]) == (structure == "rowcol")
    assert all(math_ok(s["ppl"]) for s in on_disk["shots"]) and len(on_disk["shots"]) == 2
    assert record["ppl_pruned"] == on_disk["shots"][-1]["ppl"]     # evaluated once, not twice
    assert set(on_disk["seconds"]) >= {"load", "data", "eval_dense", "prune", "eval_pruned", "save"}
    layers = surgeon.prunable_layers(run_opt.load(str(files / model), "cpu")[0])
    widest = max(max(l.weight.shape) for l in layers.values())
    total = sum(l.weight.numel() for l in layers.values())
    slack = {"unstructured": 1, "rowcol": widest}.get(structure, 4) / total
    target = round(float(sparsity) * total) / total
    assert target <= record["sparsity"] < target + slack
    # the saved folder reloads with the same zeros and the same perplexity
    again = run_opt.main(["--model", str(saved), "--sparsity", "0", "--test-file",
                          str(files / "test.txt"), "--seqlen", "32", "--eval-windows", "4",
                          "--device", "cpu"])
    assert again["ppl_dense"] == pytest.approx(record["ppl_pruned"], rel=1e-5)
    assert again["sparsity"] == pytest.approx(record["sparsity"])
    assert again["layers"] == pytest.approx(record["layers"])
    if ":" in structure:                              # every group of the saved model: N zeros
        n, m = (int(v) for v in structure.split(":"))
        weights = pruned_weights(saved)
        for name in layers:
            zeros = (weights[f"{name}.weight"].reshape(-1, m) == 0).sum(-1)
            assert (zeros >= n).all() if float(sparsity) == n / m else \
                torch.isin(zeros, torch.tensor([0, n])).all(), name


def math_ok(x):
    return x == x and x < float("inf")


def test_magnitude_needs_no_calibration_text(files, capsys):
    record = run_opt.main(["--model", str(files / "opt"), "--test-file", str(files / "test.txt"),
                           "--seqlen", "32", "--eval-windows", "2", "--method", "magnitude",
                           "--structure", "unstructured", "--sparsity", "0.5", "--shots", "1"])
    assert record["sparsity"] == pytest.approx(0.5)


@pytest.mark.parametrize("extra,message", [
    (["--sparsity", "1.5"], "argument --sparsity: must be in [0, 1), got 1.5"),
    (["--structure", "blocks"], "argument --structure: structure must be unstructured, rowcol, units or N:M"),
    (["--structure", "2:4", "--sparsity", "0.7"], "2:4 removes at most 2/4 of the weights"),
    (["--seqlen", "100"], "longer than the model's context (64)"),
    (["--train-file", "{root}/nope.txt"], "cannot read"),
    (["--train-file", "{root}/short.txt"], "has 3 tokens; calibration windows of --seqlen 32 "
                                           "need at least 33"),
    (["--test-file", "{root}/short.txt"], "fewer than one evaluation window of --seqlen 32"),
    (["--model", "{root}/nope"], "--model {root}/nope: no such folder"),
])
def test_bad_input_is_one_line_and_writes_nothing(files, tmp_path, capsys, extra, message):
    extra = [e.format(root=files) for e in extra]
    saved = tmp_path / "never"
    with pytest.raises(SystemExit) as exit:
        run_opt.main(args_for(files, "opt", "--save", str(saved), *extra))
    assert exit.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    message = message.format(root=files)
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not saved.exists()


def test_unreachable_hub_says_how_to_go_offline(files, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SystemExit):
        run_opt.main(["--model", "facebook/opt-nonexistent-125m", "--sparsity", "0"])
    err = capsys.readouterr().err
    assert "cannot load model 'facebook/opt-nonexistent-125m'" in err and "local folder" in err


def test_command_line_exits_cleanly_without_traceback(files):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    bad = subprocess.run([sys.executable, "run_opt.py", *args_for(files, "opt", "--sparsity", "2")],
                         capture_output=True, text=True, env=env,
                         cwd=os.path.dirname(os.path.abspath(__file__)))
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines() == ["error: argument --sparsity: must be in [0, 1), "
                                               "got 2"]


@pytest.mark.parametrize("model", ["opt", "llama"])
def test_compact_saves_a_smaller_model_that_reloads(files, tmp_path, capsys, model, monkeypatch):
    saved, out = tmp_path / "compact", tmp_path / "record.json"
    record = run_opt.main(args_for(files, model, "--structure", "rowcol", "--sparsity", "0.5",
                                   "--compact", "--save", str(saved), "--json", str(out)))
    on_disk = json.loads(out.read_text())
    for key in ("params_dense", "params_compact", "ppl_compact", "latency_ms_pruned",
                "latency_ms_compact"):
        assert key in on_disk, key
    assert record["params_compact"] < record["params_dense"]
    assert record["ppl_compact"] == pytest.approx(record["ppl_pruned"], rel=1e-5)
    assert "forward latency, batch" in capsys.readouterr().out
    again = run_opt.main(["--model", str(saved), "--sparsity", "0", "--test-file",
                          str(files / "test.txt"), "--seqlen", "32", "--eval-windows", "4"])
    assert again["ppl_dense"] == pytest.approx(record["ppl_compact"], rel=1e-5)
    reloaded, _ = run_opt.load(str(saved))
    assert sum(p.numel() for p in reloaded.parameters()) == record["params_compact"]
    from transformers import AutoModelForCausalLM
    plain = AutoModelForCausalLM.from_pretrained(saved, trust_remote_code=True)   # no llm-surgeon
    ids = torch.randint(0, 50, (2, 16))
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, reloaded(ids).logits)
    with pytest.raises(Exception, match="trust_remote_code"):        # without: says what it needs
        AutoModelForCausalLM.from_pretrained(saved)
    padded = tmp_path / "padded"                 # --sparsity 0: compacts the folder as it is
    third = run_opt.main(["--model", str(saved), "--sparsity", "0", "--compact",
                          "--compact-multiple", "8", "--save", str(padded), "--test-file",
                          str(files / "test.txt"), "--seqlen", "32", "--eval-windows", "4"])
    assert third["compact"]["mlp_units_removed"] == 0 and third["compact"]["mlp_units_padded"] > 0
    assert third["ppl_compact"] == pytest.approx(record["ppl_compact"], rel=1e-5)
    assert "zero MLP units added to reach multiples of 8" in capsys.readouterr().out
    wide = run_opt.load(str(padded))[0]
    assert all(m.in_features % 8 == 0 for name, m in wide.named_modules()
               if name.endswith(("fc2", "down_proj")))


def test_compact_of_unstructured_says_nothing_to_do(files, capsys):
    run_opt.main(args_for(files, "opt", "--structure", "unstructured", "--sparsity", "0.3",
                          "--compact"))
    assert "nothing to compact" in capsys.readouterr().out


def test_benchmark_grid_writes_records_and_table(files, tmp_path):
    results = tmp_path / "grid"
    cmd = [sys.executable, "benchmarks/grid.py", "--model", str(files / "llama"),
           "--train-file", str(files / "train.txt"), "--test-file", str(files / "test.txt"),
           "--nsamples", "2", "--seqlen", "32", "--eval-windows", "2", "--results", str(results),
           "--only", "dense", "magnitude-unstructured-50", "kobd-rowcol-30"]
    done = subprocess.run(cmd, capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.abspath(__file__)))
    assert done.returncode == 0, done.stderr
    assert {p.name for p in results.glob("*.json")} == {
        "dense.json", "magnitude-unstructured-50.json", "kobd-rowcol-30.json"}
    table = (tmp_path / "grid.md").read_text()
    assert "| dense |" in table and "| magnitude | " in table
    row = [line for line in table.splitlines() if line.startswith("| K-OBD |")][0]
    assert row.count("not run") == 2 and row.count("%,") == 3    # 10%, 20%: shots of the 30% run
    allocation = table.split("Sparsity per layer (percent zero) of K-OBD")[1].splitlines()
    assert allocation[2].startswith("| block | q_proj | k_proj | v_proj | o_proj | gate_proj")
    assert allocation[4].startswith("| 0 | ") and allocation[5].startswith("| 1 | ")


# ---------------------------------------------------------------------------------------------
# Bad input is caught before the model is loaded; long runs survive failures and resume


def no_loading(*args, **kwargs):
    raise AssertionError("the model was loaded before the input was checked")


@pytest.mark.parametrize("extra,message", [
    (["--json", "{tmp}/missing/record.json"], "--json {tmp}/missing/record.json cannot be written"),
    (["--json", "{tmp}"], "--json {tmp} is a folder, not a file"),
    (["--save", "{tmp}/foreign/a.txt/model"], "--save {tmp}/foreign/a.txt/model cannot be written"),
    (["--checkpoint", "{tmp}/binary.txt/ckpt"], "cannot be written"),
    (["--save", "{tmp}/foreign"], "not empty and not an output of run_opt.py"),
    (["--save", "{tmp}/foreign/a.txt"], "is a file, not a folder"),
    (["--device", "cuda:7"], "not available"),
    (["--device", "tpu9"], "device 'tpu9'"),
    (["--curvature-device", "cuda:5"], "not available"),
    (["--train-file", "{tmp}/binary.txt"], "not UTF-8 text"),
    (["--test-file", "{tmp}/nope.txt"], "cannot read"),
    (["--resume"], "--resume needs --checkpoint DIR"),
    (["--checkpoint", "{tmp}/empty", "--resume"], "no checkpoint in"),
    (["--lora-steps", "-1"], "argument --lora-steps: must be an integer >= 0, got -1"),
    (["--damp-a", "-1"], "argument --damp-a: must be a finite number >= 0, got -1"),
    (["--damp-g", "nan"], "argument --damp-g: must be a finite number >= 0, got nan"),
    (["--lora-lr", "0"], "argument --lora-lr: must be a finite number > 0, got 0"),
    (["--model", "{tmp}/nowhere"], "--model {tmp}/nowhere: no such folder"),
    (["--train-file", "{tmp}/short.txt"], "calibration windows of --seqlen 32 need at least 33"),
    (["--test-file", "{tmp}/short.txt"], "fewer than one evaluation window of --seqlen 32"),
])
def test_bad_input_is_caught_before_loading(files, tmp_path, capsys, monkeypatch, extra, message):
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "a.txt").write_text("mine")
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00 not text")
    (tmp_path / "empty").mkdir()
    (tmp_path / "short.txt").write_text("the of and")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    monkeypatch.setattr(run_opt, "load_model", no_loading)
    extra = [e.format(tmp=tmp_path) for e in extra]
    with pytest.raises(SystemExit) as exit:
        run_opt.main(args_for(files, "opt", *extra))
    assert exit.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message.format(tmp=tmp_path) in err[0], err
    assert sorted(p.name for p in tmp_path.rglob("*")) == before       # nothing written


def pruned_weights(folder):
    from safetensors.torch import load_file
    return load_file(os.path.join(folder, "model.safetensors"))


def run_with_checkpoint(files, folder, save, *extra):
    return run_opt.main(args_for(files, "llama", "--structure", "unstructured", "--sparsity",
                                 "0.5", "--shots", "3", "--checkpoint", str(folder),
                                 "--save", str(save), *extra))


def fail_at_shot(monkeypatch, k, error):
    real, calls = surgeon.shot, []

    def shot(*args, **kwargs):
        calls.append(1)
        if len(calls) == k:
            raise error
        return real(*args, **kwargs)
    monkeypatch.setattr(surgeon, "shot", shot)


@pytest.fixture(scope="module")
def uninterrupted(files, tmp_path_factory):
    root = tmp_path_factory.mktemp("whole")
    run_with_checkpoint(files, root / "ckpt", root / "model", "--lora-steps", "2")
    return pruned_weights(root / "model")


def assert_same(a, b):
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_after_a_failure_gives_the_same_weights(files, tmp_path, monkeypatch,
                                                        uninterrupted):
    fail_at_shot(monkeypatch, 3, RuntimeError("injected"))
    with pytest.raises(RuntimeError, match="injected"):
        run_with_checkpoint(files, tmp_path / "ckpt", tmp_path / "model", "--lora-steps", "2")
    monkeypatch.undo()
    record = run_with_checkpoint(files, tmp_path / "ckpt", tmp_path / "model", "--lora-steps",
                                 "2", "--resume")
    assert [s["shot"] for s in record["shots"]] == [1, 2, 3]
    assert record["resumed"]["from_shot"] == 3
    assert record["resumed"]["prune_seconds_all_shots"] >= sum(
        s["seconds"]["curvature"] for s in record["shots"])
    assert_same(pruned_weights(tmp_path / "model"), uninterrupted)


def test_a_kill_during_the_checkpoint_write_leaves_the_last_one(files, tmp_path, monkeypatch,
                                                                uninterrupted):
    real, calls = torch.save, []

    def save(obj, path):                       # the second write dies half way
        calls.append(1)
        if len(calls) == 2:
            with open(path, "wb") as f:
                f.write(b"half a checkpoint")
            raise KeyboardInterrupt
        return real(obj, path)
    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(SystemExit) as exit:
        run_with_checkpoint(files, tmp_path / "ckpt", tmp_path / "model", "--lora-steps", "2")
    assert exit.value.code == 130
    monkeypatch.undo()
    record = run_with_checkpoint(files, tmp_path / "ckpt", tmp_path / "model", "--lora-steps",
                                 "2", "--resume")
    assert [s["shot"] for s in record["shots"]] == [1, 2, 3]
    assert_same(pruned_weights(tmp_path / "model"), uninterrupted)


def test_ctrl_c_names_the_last_checkpoint(files, tmp_path, monkeypatch, capsys):
    fail_at_shot(monkeypatch, 2, KeyboardInterrupt())
    with pytest.raises(SystemExit) as exit:
        run_with_checkpoint(files, tmp_path / "ckpt", tmp_path / "model")
    assert exit.value.code == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"interrupted: the last checkpoint is in {tmp_path / 'ckpt'} (after shot "
                       "1); run the same command with --resume to go on")


def test_ctrl_c_while_loading_is_one_line(files, tmp_path, monkeypatch, capsys):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(run_opt, "load_model", interrupt)
    with pytest.raises(SystemExit) as exit:
        run_opt.main(args_for(files, "opt"))
    assert exit.value.code == 130
    assert capsys.readouterr().err.strip().splitlines() == ["interrupted"]


def test_a_finished_run_says_where_its_checkpoint_is(files, tmp_path, capsys):
    run_with_checkpoint(files, tmp_path / "ckpt", tmp_path / "model")
    size = os.path.getsize(tmp_path / "ckpt" / "checkpoint.pt") / 2**20
    assert (f"checkpoint of the last shot kept in {tmp_path / 'ckpt' / 'checkpoint.pt'} "
            f"({size:.0f} MB)") in capsys.readouterr().out


def test_resume_with_other_settings_is_refused(files, tmp_path, monkeypatch, capsys):
    fail_at_shot(monkeypatch, 2, RuntimeError("injected"))
    with pytest.raises(RuntimeError):
        run_with_checkpoint(files, tmp_path / "ckpt", tmp_path / "model")
    monkeypatch.undo()
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit:
        run_with_checkpoint(files, tmp_path / "ckpt", tmp_path / "model", "--resume",
                            "--damp-a", "0.05")
    assert exit.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: --resume: the checkpoint in {tmp_path / 'ckpt'} was made with other "
                   "settings: damp_a (0.01 there, 0.05 now)"]
    with pytest.raises(SystemExit):                           # an existing one needs --resume
        run_with_checkpoint(files, tmp_path / "ckpt", tmp_path / "other")
    assert "pass --resume" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Models across devices (accelerate): here, on CPU, with one block offloaded to disk


@pytest.mark.parametrize("structure", ["unstructured", "rowcol"])
def test_disk_offload_gives_the_same_pruned_weights(files, tmp_path, structure):
    pytest.importorskip("accelerate")
    placement = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                 "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    (tmp_path / "map.json").write_text(json.dumps(placement))
    before = (files / "llama" / "model.safetensors").read_bytes()
    common = ("--structure", structure, "--sparsity", "0.4")
    plain = run_opt.main(args_for(files, "llama", *common, "--save", str(tmp_path / "plain")))
    mapped = run_opt.main(args_for(files, "llama", *common, "--save", str(tmp_path / "mapped"),
                                   "--device-map", str(tmp_path / "map.json")))
    assert mapped["sparsity"] == plain["sparsity"] and mapped["ppl_pruned"] == plain["ppl_pruned"]
    a, b = pruned_weights(tmp_path / "plain"), pruned_weights(tmp_path / "mapped")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert (files / "llama" / "model.safetensors").read_bytes() == before   # the source untouched


def test_bad_device_map_is_caught_before_loading(files, tmp_path, capsys, monkeypatch):
    (tmp_path / "map.json").write_text('{"model.layers.0": "moon"}')
    monkeypatch.setattr(run_opt, "load_model", no_loading)
    with pytest.raises(SystemExit):
        run_opt.main(args_for(files, "llama", "--device-map", str(tmp_path / "map.json")))
    assert "must map module names to a GPU index, 'cpu' or 'disk'" in capsys.readouterr().err


def test_eval_every_k_shots_and_the_last(files, tmp_path):
    record = run_opt.main(args_for(files, "llama", "--structure", "unstructured", "--sparsity",
                                   "0.3", "--shots", "3", "--eval-every", "2", "--skip-dense-eval"))
    assert ["ppl" in shot for shot in record["shots"]] == [False, True, True]
    assert record["ppl_pruned"] == record["shots"][-1]["ppl"]


@pytest.mark.parametrize("model", ["opt", "llama"])
def test_save_every_k_shots_keeps_each_model_as_it_was_then(files, tmp_path, model):
    """--save-every 2 of 5 shots: DIR-shot-2 and DIR-shot-4 hold the models of those shots
    (compacted: perplexity as evaluated then, parameters as recorded), and the run goes on to
    the same model as without them."""
    common = ("--structure", "units", "--sparsity", "0.5", "--shots", "5", "--eval-every", "1",
              "--skip-dense-eval", "--compact")
    plain = run_opt.main(args_for(files, model, *common, "--save", str(tmp_path / "plain")))
    saved = tmp_path / "every"
    record = run_opt.main(args_for(files, model, *common, "--save", str(saved),
                                   "--save-every", "2"))
    assert [shot.get("saved") for shot in record["shots"]] == \
        [None, f"{saved}-shot-2", None, f"{saved}-shot-4", None]
    assert not os.path.exists(f"{saved}-shot-5")        # the copies left the model as it was:
    assert record["ppl_pruned"] == pytest.approx(plain["ppl_pruned"], rel=1e-6)   # (allocations
    assert record["params_compact"] == plain["params_compact"]     # may move float kernels' bits)
    sizes = []
    for k in (2, 4):
        shot = record["shots"][k - 1]
        again = run_opt.main(["--model", f"{saved}-shot-{k}", "--sparsity", "0", "--test-file",
                              str(files / "test.txt"), "--seqlen", "32", "--eval-windows", "4"])
        assert again["ppl_dense"] == pytest.approx(shot["ppl"], rel=1e-5)
        assert again["params_dense"] == shot["params_compact"]
        marker = json.loads((tmp_path / f"every-shot-{k}" / command.SAVED).read_text())
        assert (marker["shot"], marker["sparsity"]) == (k, shot["sparsity"])
        sizes.append(shot["params_compact"])
    assert record["params_dense"] > sizes[0] > sizes[1] > record["params_compact"]
    with pytest.raises(SystemExit):
        run_opt.main(args_for(files, model, *common, "--save-every", "2"))


def test_the_readme_python_example_runs(files, tmp_path, monkeypatch, capsys):
    """The README's example, as written, with a tiny model and text in place of OPT-125m."""
    readme = open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "README.md")).read()
    code = readme.split("## Use it in your own code")[1].split("```python")[1].split("```")[0]
    line = 'name, text, seqlen = "facebook/opt-125m", "train.txt", 512'
    assert line in code
    code = code.replace(line, f'name, text, seqlen = {str(files / "opt")!r}, '
                              f'{str(files / "train.txt")!r}, 16')
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)
    out = capsys.readouterr()
    assert f"{scope['report']['sparsity']:.1%} of the weights are zero" in out.out
    assert 0.1 <= scope["report"]["sparsity"] < 0.11
    assert "shot 1/1 updates" in out.err                                 # tqdm's progress


def test_brown_corpus_split_and_format(tmp_path):
    """benchmarks/assets.py on a stand-in corpus of 500 tagged samples: tags removed, `` and ''
    become ", no space before punctuation, samples 0, 10, ... in test.txt."""
    from benchmarks import assets
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    names = [f"c{chr(ord('a') + i // 40)}{i % 40 + 1:02d}" for i in range(500)]
    for i, name in enumerate(names):
        (corpus / name).write_text(f"\n\n\tSample/nn {i}/cd says/vbz ``/`` hi/uh ''/'' ,/, 4'/cd "
                                   f"10''/cd ./.\n\n\tSecond/od line/nn ./.\n")
    (corpus / "README").write_text("not a sample")
    assets.build_brown(str(corpus), str(tmp_path / "brown"))
    test = (tmp_path / "brown" / "test.txt").read_text().split("\n\n")
    train = (tmp_path / "brown" / "train.txt").read_text().split("\n\n")
    assert len(test) == 50 and len(train) == 450
    assert test[0] == 'Sample 0 says " hi ", 4\' 10" .\nSecond line.'.replace(" .", ".")
    assert test[1].startswith("Sample 10 ") and train[0].startswith("Sample 1 ")
    assert assets.same(str(tmp_path / "brown"), str(tmp_path / "brown"))


# ---------------------------------------------------------------------------------------------
# First contact: what a new user runs into, and 16-bit weights


def one_error_line(capsys, exit, code=2):
    assert exit.value.code == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_a_model_without_linear_layers_is_refused_before_loading(files, tmp_path, capsys,
                                                                 monkeypatch):
    """GPT-2's blocks hold transformers' Conv1D, not nn.Linear: one line, naming what it found."""
    from transformers import GPT2Config, GPT2LMHeadModel, AutoTokenizer
    GPT2LMHeadModel(GPT2Config(vocab_size=300, n_embd=16, n_layer=1, n_head=2,
                               n_positions=64)).save_pretrained(tmp_path / "gpt2")
    AutoTokenizer.from_pretrained(files / "opt").save_pretrained(tmp_path / "gpt2")
    monkeypatch.setattr(run_opt, "load_model", no_loading)
    with pytest.raises(SystemExit) as exit:
        run_opt.main(args_for(files, "opt", "--model", str(tmp_path / "gpt2")))
    line = one_error_line(capsys, exit)
    assert line.startswith("error: ") and "no prunable nn.Linear layers" in line
    assert "Conv1D" in line


def test_n_m_that_does_not_divide_the_widths_is_refused_before_loading(files, capsys,
                                                                       monkeypatch):
    monkeypatch.setattr(run_opt, "load_model", no_loading)
    with pytest.raises(SystemExit) as exit:
        run_opt.main(args_for(files, "llama", "--structure", "2:3", "--sparsity", "0.5"))
    assert "2:3 needs input widths divisible by 3" in one_error_line(capsys, exit)


def test_a_truncated_weights_file_is_named(files, tmp_path, capsys):
    import shutil
    shutil.copytree(files / "opt", tmp_path / "opt")
    weights = tmp_path / "opt" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(SystemExit) as exit:
        run_opt.main(args_for(files, "opt", "--model", str(tmp_path / "opt")))
    line = one_error_line(capsys, exit)
    assert f"{weights} is broken or truncated" in line and "Without a hub" not in line, line


def test_a_device_map_onto_a_missing_gpu_is_refused_before_loading(files, tmp_path, capsys,
                                                                   monkeypatch):
    (tmp_path / "map.json").write_text('{"model.embed_tokens": 0, "model.layers": 7, '
                                       '"lm_head": "cpu"}')
    monkeypatch.setattr(run_opt, "load_model", no_loading)
    with pytest.raises(SystemExit) as exit:
        run_opt.main(args_for(files, "llama", "--device-map", str(tmp_path / "map.json")))
    line = one_error_line(capsys, exit)
    assert "places modules on cuda:0, which is not available here" in line \
        or "places modules on cuda:7, which is not available here" in line, line
    assert "cannot load model" not in line


def test_save_into_an_earlier_output_says_it_replaces_it(files, tmp_path, capsys):
    for _ in range(2):
        run_opt.main(args_for(files, "opt", "--sparsity", "0", "--save", str(tmp_path / "out")))
    out = capsys.readouterr().out
    assert out.count(f"--save {tmp_path / 'out'}: replacing the model that an earlier run "
                     "saved there") == 1


def test_sigterm_is_treated_as_ctrl_c(files, tmp_path, monkeypatch, capsys, uninterrupted):
    """What a batch scheduler sends at a time limit: one line, exit 143, the checkpoint of the
    last complete shot intact, and --resume ends at the uninterrupted run's weights."""
    import signal
    real, calls = surgeon.shot, []

    def shot(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)
    monkeypatch.setattr(surgeon, "shot", shot)
    with pytest.raises(SystemExit) as exit:
        run_with_checkpoint(files, tmp_path / "ckpt", tmp_path / "model", "--lora-steps", "2")
    assert exit.value.code == 143
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"terminated: the last checkpoint is in {tmp_path / 'ckpt'} (after shot 1); run the "
        "same command with --resume to go on")
    assert signal.getsignal(signal.SIGTERM) is not command.terminate       # handler restored
    monkeypatch.undo()
    run_with_checkpoint(files, tmp_path / "ckpt", tmp_path / "model", "--lora-steps", "2",
                        "--resume")
    assert_same(pruned_weights(tmp_path / "model"), uninterrupted)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("structure,sparsity", [("unstructured", "0.5"), ("2:4", "0.5"),
                                                ("rowcol", "0.3")])
def test_16_bit_weights_end_to_end(files, tmp_path, dtype, structure, sparsity, device):
    """The weights stay 16-bit through pruning and saving, removed ones exactly zero."""
    record = run_opt.main(args_for(files, "llama", "--dtype", dtype, "--structure", structure,
                                   "--sparsity", sparsity, "--save", str(tmp_path / "out"),
                                   "--device", device))
    assert record["settings"]["dtype"] == dtype and record["model_dtype"] == dtype
    assert math.isfinite(record["ppl_pruned"])
    saved = pruned_weights(tmp_path / "out")
    assert {v.dtype for v in saved.values()} == {getattr(torch, dtype)}
    pruned = [v for k, v in saved.items() if "proj" in k]
    zeros = sum(int((v == 0).sum()) for v in pruned) / sum(v.numel() for v in pruned)
    assert zeros == pytest.approx(record["sparsity"]) and zeros >= float(sparsity)
    if structure == "2:4":
        assert all(((v.reshape(-1, 4) == 0).sum(-1) == 2).all() for v in pruned)


def test_dtype_auto_is_the_checkpoints_own(files, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    AutoModelForCausalLM.from_pretrained(files / "opt", dtype=torch.bfloat16).save_pretrained(
        tmp_path / "bf16")
    AutoTokenizer.from_pretrained(files / "opt").save_pretrained(tmp_path / "bf16")
    auto = run_opt.main(args_for(files, "opt", "--model", str(tmp_path / "bf16"), "--dtype",
                                 "auto", "--sparsity", "0"))
    cpu_default = run_opt.main(args_for(files, "opt", "--model", str(tmp_path / "bf16"),
                                        "--sparsity", "0"))
    assert (auto["model_dtype"], cpu_default["model_dtype"]) == ("bfloat16", "float32")


def test_gpu_check_runs_in_its_cpu_mode(tmp_path):
    """benchmarks/gpu_check.py --cpu: the GPU check's code on tiny shapes, so that it cannot rot."""
    out = tmp_path / "check.json"
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--cpu", "--json", str(out)],
                          cwd=os.path.dirname(os.path.abspath(__file__)), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads(out.read_text())
    assert [(r["run"], r["shots_timed"]) for r in record["runs"]] == [("rowcol", 2), ("2:4", 5)]
    for r in record["runs"]:
        assert r["sparsity_reached"] >= r["target_reached"] and math.isfinite(r["loss_after"])
        assert r["predicted_peak_mb"] > 0 and r["seconds_all_shots_extrapolated"] >= 0
    assert record["runs"][1]["sparsity_reached"] == 0.5
    assert "| tiny | rowcol | bfloat16 | 2 of 24 |" in proc.stdout


def test_pip_install_gives_the_module_and_the_command(tmp_path):
    """`pip install .` (here into a folder, without dependencies or network): `import surgeon`
    works anywhere, and the `llm-surgeon` command is run_opt's."""
    root = os.path.dirname(os.path.abspath(__file__))
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                    "--no-build-isolation", "--target", str(target), root], check=True,
                   capture_output=True, timeout=300, cwd=tmp_path)
    env = {**os.environ, "PYTHONPATH": str(target)}
    where = subprocess.run([sys.executable, "-c", "import surgeon; print(surgeon.__file__)"],
                           env=env, cwd=tmp_path, capture_output=True, text=True, check=True)
    assert where.stdout.strip().startswith(str(target))
    help_ = subprocess.run([str(target / "bin" / "llm-surgeon"), "--help"], env=env, cwd=tmp_path,
                           capture_output=True, text=True)
    assert help_.returncode == 0 and "--dtype" in help_.stdout, help_.stderr[-1000:]
    files = make_files(tmp_path / "files")                      # a good run ends with exit 0
    run = subprocess.run([str(target / "bin" / "llm-surgeon"),
                          *args_for(files, "llama", "--sparsity", "0.2", "--shots", "1")],
                         env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "perplexity: dense" in run.stdout and "'settings'" not in run.stderr


def test_rowcol_in_several_shots_lands_on_the_target_in_the_saved_model(files, tmp_path):
    """Counted in what --save wrote: the zeros of the pruned layers' weights."""
    record = run_opt.main(args_for(files, "llama", "--structure", "rowcol", "--sparsity", "0.4",
                                   "--shots", "3", "--save", str(tmp_path / "out")))
    pruned = [v for k, v in pruned_weights(tmp_path / "out").items() if "layers." in k
              and k.endswith("proj.weight")]
    total = sum(v.numel() for v in pruned)
    zeros = sum(int((v == 0).sum()) for v in pruned)
    widest = max(max(v.shape) for v in pruned)
    assert round(0.4 * total) <= zeros < round(0.4 * total) + widest     # to one candidate
    assert zeros == round(record["sparsity"] * total)


def test_a_compacted_folder_loads_without_a_warning(files, tmp_path):
    saved = tmp_path / "compact"
    run_opt.main(args_for(files, "llama", "--structure", "rowcol", "--sparsity", "0.5",
                          "--compact", "--save", str(saved)))
    code = (f"import run_opt, transformers; m, t = run_opt.load({str(saved)!r}); "
            "print(isinstance(m, transformers.LlamaForCausalLM))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.abspath(__file__)), timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "True", proc.stderr
    assert "model of type" not in proc.stderr, proc.stderr


# ---------------------------------------------------------------------------------------------
# First contact, round 3


def tiny_folder(root, name, model, files):
    """A model saved with the test tokenizer beside it."""
    from transformers import AutoTokenizer
    model.save_pretrained(root / name)
    AutoTokenizer.from_pretrained(files / "opt").save_pretrained(root / name)
    return root / name


def moe_models():
    from transformers import MixtralConfig, MixtralForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM
    small = dict(vocab_size=300, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                 num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    return {"mixtral": MixtralForCausalLM(MixtralConfig(**small, num_local_experts=4,
                                                        num_experts_per_tok=2)),
            "qwen2_moe": Qwen2MoeForCausalLM(Qwen2MoeConfig(
                **small, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8,
                shared_expert_intermediate_size=16))}


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe"])
def test_a_mixture_of_experts_is_refused_before_loading(files, tmp_path, capsys, monkeypatch,
                                                        kind):
    """Its experts are not pruned as they should be (3-D parameters in transformers 5, layers
    that see a subset of the tokens in 4.x): one line from the config, before loading."""
    folder = tiny_folder(tmp_path, kind, moe_models()[kind], files)
    monkeypatch.setattr(run_opt, "load_model", no_loading)
    with pytest.raises(SystemExit) as exit:
        run_opt.main(args_for(files, "opt", "--model", str(folder)))
    line = one_error_line(capsys, exit)
    assert f"a mixture-of-experts model ({kind}, 4 experts) is not supported" in line, line


def test_block_weights_that_are_not_pruned_are_said(capsys):
    """A block matrix outside nn.Linear (here GPT-2's Conv1D beside a Linear): its share named."""
    from transformers.pytorch_utils import Conv1D
    model = torch.nn.Module()
    model.blocks = torch.nn.ModuleList([torch.nn.Sequential(torch.nn.Linear(8, 8),
                                                            Conv1D(24, 8))])
    command.unpruned(model, surgeon.prunable_layers(model))
    out = capsys.readouterr().out
    assert "note: 75.0% of the weights in the blocks' matrices are not pruned" in out
    assert "Conv1D" in out
    command.unpruned(model.blocks[0][0], {"w": model.blocks[0][0]})     # nothing left: silent
    assert capsys.readouterr().out == ""


def test_a_damaged_checkpoint_is_one_line_and_left_as_it_is(files, tmp_path, capsys):
    run_with_checkpoint(files, tmp_path / "ckpt", tmp_path / "model")
    ckpt = tmp_path / "ckpt" / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:ckpt.stat().st_size // 2])
    damaged = ckpt.read_bytes()
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit:
        run_with_checkpoint(files, tmp_path / "ckpt", tmp_path / "model2", "--resume")
    line = one_error_line(capsys, exit)
    assert line.startswith(f"error: --resume: {ckpt} is damaged or partial ("), line
    assert ckpt.read_bytes() == damaged and not (tmp_path / "model2").exists()


@pytest.mark.parametrize("keep,missing", [
    (("config.json",), "weights (model.safetensors or pytorch_model.bin) and no tokenizer "
                       "(tokenizer.json, tokenizer_config.json, ...)"),
    (("config.json", "model.safetensors"), "tokenizer (tokenizer.json, tokenizer_config.json, ...)"),
    (("tokenizer.json", "tokenizer_config.json", "model.safetensors"), "config.json"),
])
def test_an_incomplete_model_folder_is_one_whole_sentence(files, tmp_path, capsys, keep, missing):
    (tmp_path / "part").mkdir()
    for name in keep:
        (tmp_path / "part" / name).write_bytes((files / "llama" / name).read_bytes())
    with pytest.raises(SystemExit) as exit:
        run_opt.main(args_for(files, "llama", "--model", str(tmp_path / "part")))
    assert one_error_line(capsys, exit) == (
        f"error: --model {tmp_path / 'part'} has no {missing}; a model folder holds what "
        "save_pretrained writes for the model and for its tokenizer")


def test_a_model_file_is_not_a_folder(files, capsys):
    with pytest.raises(SystemExit) as exit:
        run_opt.main(args_for(files, "llama", "--model", str(files / "llama" / "config.json")))
    assert "config.json is a file, not a folder; give the folder that holds" in \
        one_error_line(capsys, exit)


def test_compact_on_fused_projections_says_so_before_pruning(files, tmp_path, capsys,
                                                             monkeypatch):
    from transformers import Phi3Config, Phi3ForCausalLM
    phi3 = Phi3ForCausalLM(Phi3Config(vocab_size=300, hidden_size=16, intermediate_size=32,
                                      num_hidden_layers=1, num_attention_heads=2,
                                      num_key_value_heads=1, max_position_embeddings=64,
                                      pad_token_id=0))
    folder = tiny_folder(tmp_path, "phi3", phi3, files)
    monkeypatch.setattr(run_opt, "load_model", no_loading)
    with pytest.raises(AssertionError, match="loaded before"):
        run_opt.main(args_for(files, "llama", "--model", str(folder), "--compact"))
    assert ("--compact: compaction finds no separate MLP and no attention projections in "
            f"{folder}'s blocks") in capsys.readouterr().out
    with pytest.raises(AssertionError, match="loaded before"):                  # Llama: silent
        run_opt.main(args_for(files, "llama", "--compact"))
    assert "--compact: compaction finds" not in capsys.readouterr().out


def test_every_long_stage_shows_progress(files, capsys):
    run_opt.main(args_for(files, "llama", "--structure", "rowcol", "--sparsity", "0.2",
                          "--shots", "1", "--lora-steps", "2"))
    err = capsys.readouterr().err
    for stage in ("eval dense", "shot 1/1 curvature", "shot 1/1 costs", "shot 1/1 updates",
                  "shot 1/1 low-rank", "eval pruned"):
        assert stage in err, stage
    import time
    with command.working("tokenize train.txt"):           # shown once it takes a second
        time.sleep(1.6)
    assert capsys.readouterr().err == "tokenize train.txt: 00:01\n"   # not a terminal: one line
    with command.working("tokenize test.txt"):            # a second is not reached: nothing
        pass
    assert capsys.readouterr().err == ""


def test_a_hub_id_without_a_hub_fails_in_seconds(capsys, monkeypatch):
    """No retries for a minute: the hub is probed first, and offline mode reads the cache."""
    import time
    from huggingface_hub import constants
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(command, "hub_reachable", lambda timeout=3.0: False)     # as here
    tic = time.time()
    with pytest.raises(SystemExit) as exit:
        run_opt.main(["--model", "facebook/opt-nonexistent-125m", "--sparsity", "0"])
    line = one_error_line(capsys, exit)
    assert time.time() - tic < 20 and "Without a hub, pass a local folder" in line, line


def test_the_hub_probe_answers_fast_without_a_hub(monkeypatch):
    """An endpoint that does not answer (a closed local port) is found out, not waited for."""
    import socket
    import time
    from huggingface_hub import constants
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]                     # bound, not listening: refused
        monkeypatch.setattr(constants, "ENDPOINT", f"https://127.0.0.1:{port}")
        tic = time.time()
        assert not command.hub_reachable()
    assert time.time() - tic < 5


@pytest.mark.parametrize("extra,message", [
    (("--json", "{tmp}/missing/record.json"), "cannot be written (No such file or directory)"),
    (("--save", "{tmp}/file.txt"), "is a file, not a folder"),
    (("--checkpoint", "{tmp}/missing/x/ckpt"), None),                 # made by rank 0: fine
])
def test_ranks_other_than_0_check_the_outputs_too_writing_nothing(files, tmp_path, monkeypatch,
                                                                  extra, message):
    """Under torchrun (here rank 1 of 2, no process group) a bad output path fails on every
    rank, so that no rank waits for rank 0 in init_process_group; only rank 0 writes."""
    (tmp_path / "file.txt").write_text("mine")
    monkeypatch.setenv("RANK", "1")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    args = command.parse_args(args_for(files, "llama", *(e.format(tmp=tmp_path) for e in extra)))
    if message is None:
        command.validate(args)
    else:
        with pytest.raises(command.Failure, match=message.replace("(", r"\(").replace(")", r"\)")):
            command.validate(args)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


@pytest.mark.parametrize("save", [True, False])
def test_a_failure_after_the_pruning_keeps_the_pruned_model(files, tmp_path, capsys, monkeypatch,
                                                             save):
    """Compaction fails after the pruning: the pruned model is saved as it is (in --save DIR, or
    in a temporary folder) before the error line names the failure and the folder (exit 1)."""
    import compact

    def broken(model, multiple=1):
        raise RuntimeError("compaction broke")
    monkeypatch.setattr(compact, "compact", broken)
    extra = ("--save", str(tmp_path / "model")) if save else ()
    with pytest.raises(SystemExit) as exit:
        run_opt.main(args_for(files, "llama", "--structure", "units", "--sparsity", "0.3",
                              "--compact", *extra))
    assert exit.value.code == 1
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("error: after the pruning, RuntimeError: compaction broke. The pruned "
                           "model is saved in "), line
    folder = line.split("saved in ")[1].split(" ")[0]
    assert folder == str(tmp_path / "model") or not save
    marker = json.loads(open(os.path.join(folder, command.SAVED)).read())
    again = run_opt.main(["--model", folder, "--sparsity", "0", "--test-file",
                          str(files / "test.txt"), "--seqlen", "32", "--eval-windows", "4",
                          "--device", "cpu"])
    assert again["ppl_dense"] == pytest.approx(marker["ppl_pruned"], rel=1e-6)
    assert again["sparsity"] > 0.25


@pytest.mark.parametrize("sparsity", ["0.75", "0.99"])
def test_units_that_empty_whole_mlps_compact_save_and_reload(files, tmp_path, sparsity):
    """Whole MLPs and attention blocks gone (at 99% all of them): an MLP is cut to zero width,
    an attention without heads is skipped, and the saved folder loads with
    from_pretrained(trust_remote_code=True) and run_opt.load to the same logits, the perplexity
    of the model before compaction."""
    from transformers import AutoModelForCausalLM
    record = run_opt.main(args_for(files, "llama", "--structure", "units", "--sparsity", sparsity,
                                   "--compact", "--save", str(tmp_path / "model")))
    assert record["ppl_compact"] == pytest.approx(record["ppl_pruned"], rel=1e-6)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "model", trust_remote_code=True)
    ours = run_opt.load(str(tmp_path / "model"))[0]
    if sparsity == "0.99":
        assert all(block.mlp.down_proj.in_features == 0 == block.self_attn.q_proj.out_features
                   for block in plain.model.layers)
    ids = torch.randint(0, 50, (2, 12))
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, ours(ids).logits)
    again = run_opt.main(["--model", str(tmp_path / "model"), "--sparsity", "0", "--test-file",
                          str(files / "test.txt"), "--seqlen", "32", "--eval-windows", "4",
                          "--device", "cpu"])
    assert again["ppl_dense"] == pytest.approx(record["ppl_pruned"], rel=1e-6)


def other_architecture(arch):
    """A tiny random model of another architecture (the test tokenizer's 300 words)."""
    import transformers as T
    kinds = {"phi": (T.PhiConfig, T.PhiForCausalLM, {}),
             "mistral": (T.MistralConfig, T.MistralForCausalLM, {"num_key_value_heads": 1}),
             "qwen2": (T.Qwen2Config, T.Qwen2ForCausalLM, {"num_key_value_heads": 1}),
             "qwen3": (T.Qwen3Config, T.Qwen3ForCausalLM, {"num_key_value_heads": 1,
                                                          "head_dim": 8}),
             "gemma2": (T.Gemma2Config, T.Gemma2ForCausalLM, {"num_key_value_heads": 1,
                                                             "head_dim": 8}),
             "stablelm": (T.StableLmConfig, T.StableLmForCausalLM, {"num_key_value_heads": 1}),
             "granite": (T.GraniteConfig, T.GraniteForCausalLM, {"num_key_value_heads": 1}),
             "phi3": (T.Phi3Config, T.Phi3ForCausalLM, {"pad_token_id": 0, "eos_token_id": 1,
                                                       "bos_token_id": 1})}
    config, model, extra = kinds[arch]
    torch.manual_seed(0)
    return model(config(vocab_size=300, hidden_size=16, intermediate_size=32,
                        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=64,
                        **extra))


@pytest.mark.parametrize("arch", ["phi", "mistral", "qwen2", "qwen3", "gemma2", "stablelm",
                                  "granite"])
def test_units_prune_compact_and_reload_on_other_architectures(files, tmp_path, capsys, arch):
    """Phi's output projection is `dense`; the others are Llama's shape with biases, norms or
    sliding windows of their own: heads and MLP units prune to their target (counted as what
    compaction removes, printed and recorded beside the sparsity), compact and reload to the
    same perplexity."""
    folder = tiny_folder(tmp_path, arch, other_architecture(arch), files)
    args = args_for(files, "llama", "--structure", "units", "--sparsity", "0.3", "--compact",
                    "--save", str(tmp_path / "model"))
    args[1] = str(folder)
    record = run_opt.main(args)
    assert record["compact"]["mlp_units_removed"] > 0
    assert 0.3 <= record["units_removed"] <= record["sparsity"]
    assert [s["units_removed"] for s in record["shots"]][-1] == record["units_removed"]
    out = capsys.readouterr().out
    assert f"shot 2/2: sparsity {record['sparsity']:.4f} (units removed " in out
    assert "in removed heads and MLP units (what compaction removes): " in out
    assert record["ppl_compact"] == pytest.approx(record["ppl_pruned"], rel=1e-5)
    again = run_opt.main(["--model", str(tmp_path / "model"), "--sparsity", "0", "--test-file",
                          str(files / "test.txt"), "--seqlen", "32", "--eval-windows", "4",
                          "--device", "cpu"])
    assert again["ppl_dense"] == pytest.approx(record["ppl_pruned"], rel=1e-5)


def test_units_on_fused_projections_is_one_line_before_loading(files, tmp_path, capsys,
                                                               monkeypatch):
    """Phi3 fuses q, k, v (qkv_proj) and gate, up (gate_up_proj): units cannot cut its heads
    and MLP units, which one line says before the model loads, with what to run instead."""
    folder = tiny_folder(tmp_path, "phi3", other_architecture("phi3"), files)
    capsys.readouterr()
    monkeypatch.setattr(run_opt, "load_model", no_loading)
    args = args_for(files, "llama", "--structure", "units", "--sparsity", "0.3")
    args[1] = str(folder)
    with pytest.raises(SystemExit) as exit:
        run_opt.main(args)
    line = one_error_line(capsys, exit)
    assert "--structure units needs separate projections" in line and "phi3" in line
    assert "q, k and v (qkv_proj" in line and "gate and up" in line and "rowcol" in line


@pytest.mark.parametrize("extra,message", [
    (("--structure", "rowcol", "--unit-cost", "lines"),
     "--unit-cost does nothing with --structure rowcol: it is for --structure units"),
    (("--structure", "2:4", "--sparsity", "0.5", "--unit-order", "per-weight"),
     "--unit-order does nothing with --structure 2:4"),
    (("--compact-multiple", "8",), "--compact-multiple does nothing with no --compact"),
    (("--structure", "unstructured", "--damp-costs"), "--damp-costs does nothing with"),
    (("--structure", "rowcol", "--max-correlate", "4"), "--max-correlate does nothing with"),
    (("--method", "kobd", "--damp-g", "0.2"), "--damp-g does nothing with --method kobd"),
    (("--structure", "unstructured", "--lora-rank", "4"),
     "--lora-rank does nothing with --lora-steps 0"),
    (("--method", "magnitude", "--curvature-device", "cpu"),
     "--curvature-device does nothing with --method magnitude"),
])
def test_a_flag_that_does_nothing_is_an_error_before_loading(files, capsys, monkeypatch, extra,
                                                            message):
    monkeypatch.setattr(run_opt, "load_model", no_loading)
    with pytest.raises(SystemExit) as exit:
        run_opt.main(args_for(files, "opt", *extra))
    assert message in one_error_line(capsys, exit)

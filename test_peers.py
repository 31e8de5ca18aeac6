"""Tests for benchmarks/peers/sparsegpt_wanda.py (SparseGPT and Wanda) against brute-force oracles on tiny layers,
and block by block on tiny random OPT and Llama models. Nothing is downloaded."""
import itertools
import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

import surgeon
from benchmarks import grid
from benchmarks.peers import sparsegpt_wanda as peers
from conftest import make_files


def layer(rows=4, cols=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=gen, dtype=torch.float64)
    X = torch.randn(3 * cols, cols, generator=gen, dtype=torch.float64)
    return W, 2 * X.T @ X / len(X)


def damped(H, damp=0.01):
    return H + damp * H.diagonal().mean() * torch.eye(len(H), dtype=H.dtype)


def sequential_obs(W, H, mask):
    """Each row on its own, columns left to right: a removed weight is solved out with the OBS
    update under the inverse Hessian of the columns not visited yet, H[j:, j:]^-1, dense."""
    W = W.clone()
    for j in range(W.shape[1]):
        Hinv = torch.linalg.inv(H[j:, j:])
        for i in range(W.shape[0]):
            if mask[i, j]:
                W[i, j:] -= W[i, j] / Hinv[0, 0] * Hinv[0]
    W[mask] = 0
    return W


def test_sparsegpt_one_column_is_the_obs_update_of_one_weight():
    W, H = layer()
    mask = torch.zeros_like(W, dtype=torch.bool)
    mask[:, 0] = True
    Hinv = torch.linalg.inv(damped(H))
    expected = W - W[:, :1] / Hinv[0, 0] * Hinv[0]
    assert torch.allclose(peers.sparsegpt(W, H, mask=mask), expected, atol=1e-10)


@pytest.mark.parametrize("block", [128, 3])
def test_sparsegpt_with_a_fixed_mask_is_sequential_obs(block):
    W, H = layer(seed=1)
    mask = torch.rand(W.shape, generator=torch.Generator().manual_seed(2)) < 0.5
    new = peers.sparsegpt(W, H, mask=mask, block=block)
    assert torch.allclose(new, sequential_obs(W, damped(H), mask), atol=1e-10)
    assert (new[mask] == 0).all()


def test_sparsegpt_unstructured_removes_exactly_its_share_of_every_block():
    W, H = layer(rows=6, cols=10, seed=3)
    new = peers.sparsegpt(W, H, sparsity=0.5, block=4)       # blocks of 4, 4, 2 columns
    zeros = (new == 0)
    assert [int(zeros[:, b:b + 4].sum()) for b in (0, 4, 8)] == [12, 12, 6]


def test_sparsegpt_mask_is_the_smallest_scores_of_the_block():
    W, H = layer(rows=5, cols=6, seed=4)
    U = torch.linalg.cholesky(torch.linalg.inv(damped(H)), upper=True)
    score = W**2 / U.diagonal()**2
    order = sorted(range(W.numel()), key=lambda q: float(score.flatten()[q]))
    expected = torch.zeros(W.numel(), dtype=torch.bool)
    expected[order[:15]] = True
    new = peers.sparsegpt(W, H, sparsity=0.5)
    assert torch.equal(new.flatten() == 0, expected)


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8)])
def test_n_m_groups_are_valid(n, m):
    W, H = layer(rows=5, cols=16, seed=5)
    x_norm = H.diagonal().sqrt()
    for new in (peers.sparsegpt(W, H, n=n, m=m),
                W.masked_fill(peers.wanda_mask(W, x_norm, n=n, m=m), 0)):
        assert ((new.reshape(5, 16 // m, m) == 0).sum(-1) == n).all()


def test_wanda_mask_is_a_ranking_within_each_row():
    W, H = layer(rows=4, cols=9, seed=6)
    x_norm = H.diagonal().sqrt()
    mask = peers.wanda_mask(W, x_norm, sparsity=0.4)
    for i in range(4):
        score = [abs(float(W[i, j])) * float(x_norm[j]) for j in range(9)]
        drop = sorted(range(9), key=score.__getitem__)[:3]           # int(9 * 0.4) = 3
        assert mask[i].nonzero()[:, 0].tolist() == sorted(drop)


def test_wanda_n_m_drops_the_n_smallest_of_each_group():
    W, H = layer(rows=3, cols=8, seed=7)
    x_norm = H.diagonal().sqrt()
    mask = peers.wanda_mask(W, x_norm, n=2, m=4)
    for i, g in itertools.product(range(3), range(2)):
        cols = range(4 * g, 4 * g + 4)
        best = min(itertools.combinations(cols, 2),
                   key=lambda c: sum(abs(float(W[i, j])) * float(x_norm[j]) for j in c))
        assert mask[i, 4 * g:4 * g + 4].nonzero()[:, 0].add(4 * g).tolist() == list(best)


def tiny(kind):
    torch.manual_seed(0)
    if kind == "opt":
        return OPTForCausalLM(OPTConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2,
                                        ffn_dim=32, num_attention_heads=2,
                                        max_position_embeddings=64, word_embed_proj_dim=16)).eval()
    return LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32,
                                        num_hidden_layers=2, num_attention_heads=2,
                                        num_key_value_heads=1, max_position_embeddings=64)).eval()


@pytest.mark.parametrize("kind", ["opt", "llama"])
@pytest.mark.parametrize("method", peers.METHODS)
def test_block_by_block_reaches_the_sparsity_and_the_model_runs(kind, method):
    model = tiny(kind)
    windows = [torch.randint(0, 50, (1, 12), generator=torch.Generator().manual_seed(i))
               for i in range(3)]
    seconds = peers.prune(model, windows, method, sparsity=0.5)
    assert set(seconds) == {"calibration", "updates"}
    layers = surgeon.prunable_layers(model)
    assert all(abs(s - 0.5) < 1e-9 for s in surgeon.layer_sparsity(layers).values())
    assert torch.isfinite(model(windows[0]).logits).all()


def test_second_block_is_pruned_from_the_first_blocks_pruned_outputs(monkeypatch):
    """The statistics of block 1 are those of the inputs that the *pruned* block 0 gives."""
    model = tiny("llama")
    windows = [torch.randint(0, 50, (1, 12), generator=torch.Generator().manual_seed(i))
               for i in range(2)]
    seen = {}
    real = peers.prune_layer

    def spy(layer, stat, method, sparsity, n, m):
        seen.setdefault(id(layer), stat.clone())
        real(layer, stat, method, sparsity, n, m)

    monkeypatch.setattr(peers, "prune_layer", spy)
    peers.prune(model, windows, "wanda", sparsity=0.5)
    q1 = model.model.layers[1].self_attn.q_proj              # its input: block 0's output, normed
    inputs = []
    handle = q1.register_forward_hook(lambda mod, inp, out: inputs.append(inp[0].reshape(-1, 16)))
    with torch.no_grad():
        for ids in windows:
            model(ids)                                       # the whole model is pruned now,
    handle.remove()                                          # block 0 as block 1 saw it
    x = torch.cat(inputs).double()
    assert torch.allclose(seen[id(q1)], x.square().sum(0).sqrt(), rtol=1e-5)


def test_structure_parsing():
    assert peers.parse_structure("unstructured") == (0, 0)
    assert peers.parse_structure("4:8") == (4, 8)
    for bad in ("4:4", "0:4", "a:b", "2-4", "rowcol"):
        with pytest.raises(Exception):
            peers.parse_structure(bad)


def test_command_line_writes_a_grid_record(tmp_path):
    files = make_files(tmp_path)
    out = tmp_path / "sparsegpt-24.json"
    record = peers.main(["--method", "sparsegpt", "--structure", "2:4", "--model",
                         str(files / "llama"), "--train-file", str(files / "train.txt"),
                         "--test-file", str(files / "test.txt"), "--nsamples", "2", "--seqlen",
                         "16", "--eval-windows", "2", "--device", "cpu", "--json", str(out)])
    assert out.exists() and record["sparsity"] == 0.5 and record["shots"][0]["target"] == 0.5
    assert record["ppl_pruned"] > 0 and record["provenance"]["threads"] >= 1
    assert grid.cell(grid.load_records(str(tmp_path)), "sparsegpt", "2:4")[1] == 0.5


def test_quality_time_points_come_from_the_grid_records():
    pytest.importorskip("matplotlib")                  # benchmarks/requirements.txt
    from benchmarks import figure
    shots = lambda *s: [{"seconds": {"curvature": x, "checkpoint": 9.0}} for x in s]
    rec = lambda ppl, k, *s: {"ppl_pruned": ppl, "settings": {"shots": k}, "shots": shots(*s)}
    records = {"surgeon-unstructured-50": rec(50.0, 5, 10, 10, 10, 10, 10),
               "surgeon-unstructured-50-shots-1": rec(70.0, 1, 10),
               "sparsegpt-unstructured-50": rec(60.0, 1, 3),
               "surgeon-24": rec(100.0, 5, 10, 10, 10, 10, 10)}
    curves = figure.quality_time(records, "unstructured-50")
    assert curves["LLM Surgeon"] == [(10.0, 70.0, 1), (50.0, 50.0, 5)]      # checkpoints not
    assert curves["SparseGPT"] == [(3.0, 60.0, 1)] and "magnitude" not in curves  # counted


def test_units_figure_counts_parameters_and_speed_from_the_records(tmp_path):
    """The units curve: every evaluated shot at the dense parameters less the removed weights,
    saved shots and the last as compacted, runs of one schedule together; the speed-up of each
    model over the dense one of its own record, labelled by its name."""
    pytest.importorskip("matplotlib")
    from benchmarks import figure

    def run(sparsity, shots, compact, points, unit_cost="cut", **extra):
        return {"settings": {"sparsity": sparsity, "shots": shots, "lora_steps": 3,
                             "unit_cost": unit_cost},
                "params_dense": 100, "sparsity_before": 0.0, "params_compact": compact,
                "sparsity": sparsity, "ppl_compact": points[-1]["ppl"], "shots": points, **extra}

    records = {"dense": {"params_dense": 100, "ppl_dense": 40.0},    # 20 weights in the layers
               "surgeon-units-30": run(0.3, 6, 94, [{"sparsity": 0.05}, {"sparsity": 0.15,
                                                                         "ppl": 50.0},
                                                    {"sparsity": 0.3, "ppl": 60.0}]),
               "surgeon-units-20": run(0.2, 4, 96, [{"sparsity": 0.1, "ppl": 44.0,
                                                     "params_compact": 98},
                                                    {"sparsity": 0.2, "ppl": 55.0}],
                                       pruned_weights=20),
               "surgeon-units-30-lines": run(0.3, 6, 94, [{"sparsity": 0.3, "ppl": 58.0}],
                                             unit_cost="lines"),
               "slicegpt-rowcol-30": {"params_compact": 90, "ppl_pruned": 300.0},
               "slicegpt-rowcol-30-params": {"params_compact": 70, "ppl_pruned": 400.0}}
    points = figure.units_points(records)
    assert points == {    # one schedule, one curve; 0.15 unsaved: 100 less 0.15 of the 20 weights
        "LLM Surgeon, heads and MLP units, 5% a shot, 3 low-rank steps": [
            (94, 60.0), (96, 55.0), (97.0, 50.0), (98, 44.0), (100, 40.0)],
        "LLM Surgeon, heads and MLP units, 5% a shot, 3 low-rank steps, "     # its own curve
        "a unit costs the sum of its lines": [(94, 58.0), (100, 40.0)],
        "SliceGPT": [(70, 400.0), (90, 300.0)]}
    (tmp_path / "l.json").write_text(json.dumps({"dense": {"latency_ms": 10.0, "ppl": 40.0},
                                                 "units-24-shots": {"latency_ms": 8.0,
                                                                    "ppl": 60.0},
                                                 "units-paper-20": {"latency_ms": 5.0,
                                                                    "ppl": 50.0},
                                                 "units-paper-30": {"latency_ms": 4.0,
                                                                    "speedup": 2.4,
                                                                    "speedup_over": "dense",
                                                                    "ppl": 70.0}}))
    assert figure.speed_points(str(tmp_path)) == {    # the rounds' ratio where it is recorded
        "LLM Surgeon, heads and MLP units, 1.25% a shot, 3 low-rank steps": [
            (1.25, 60.0), (2.0, 50.0), (2.4, 70.0)]}

"""Heads and MLP units as candidates (structure "units"): every cut's cost against the brute-force
dense OBS solve on tiny layers, the update against it, the threshold against a greedy walk with
shared grouped-query lines, and end to end on tiny OPT and Llama: the target to one unit, every
taken unit's lines zero, and compaction left with no zero line. Nothing is downloaded."""
import pytest
import torch

import compact
import surgeon
import units as units_
from surgeon import Settings
from units import UnitGroup
from conftest import calib, linear_of, make_files, mask_of, obs, tiny_layer, tiny_llama, tiny_opt


def one_layer_units(axis, width, m, n, cost="cut"):
    """One layer 'l' (m, n) whose rows (or columns) are units of `width` lines, each its own cut."""
    count = (m if axis == "rows" else n) // width
    return structure([UnitGroup(count, [("l", axis, width)], [0])], cost, l=(m, n))


def structure(groups, cost="cut", order="cost", **shapes):
    """units.Units over layers of these (out, in) shapes, in this order (no weights)."""
    layers = {name: torch.nn.Linear(n, m, bias=False, device="meta")
              for name, (m, n) in shapes.items()}
    return units_.Units(groups, layers, cost, order)


@pytest.mark.parametrize("axis,width", [("rows", 1), ("rows", 2), ("rows", 3), ("cols", 1),
                                        ("cols", 2), ("cols", 4)])
@pytest.mark.parametrize("bias", [False, True])
def test_cut_costs_are_the_joint_obs_cost_of_the_lines(axis, width, bias):
    """damp_costs: exactly the OBS cost of removing the block of rows (with their bias) or
    columns under the damped F; a dead row or column inside a block costs nothing more."""
    W, A, G, _, _ = tiny_layer(m=6, n=8 + bias, seed=11)
    n_in = 8
    s = Settings(structure="units", damp_a=0.3, damp_g=0.2, damp_costs=True)
    quad = surgeon.quadratic(linear_of(W, n_in), A, G, s, name="l")
    units = one_layer_units(axis, width, 6, n_in)
    cost = units.candidates(quad, s).cost.double()
    k = W.shape[1]
    A_hat = A + 0.3 * A.diagonal().mean() * torch.eye(k, dtype=A.dtype)
    G_hat = G + 0.2 * G.diagonal().mean() * torch.eye(6, dtype=G.dtype)
    for b in range(len(cost)):
        lines = range(b * width, (b + 1) * width)
        Q = mask_of(W.shape, rows=lines) if axis == "rows" else mask_of(W.shape, cols=lines)
        assert torch.isclose(cost[b], obs(W, A_hat, G_hat, Q)[1], rtol=1e-5), b


@pytest.mark.parametrize("method", ["kobd", "lobd", "magnitude"])
def test_cut_costs_of_the_baselines_are_the_quadratic_form(method):
    W, A, G, _, _ = tiny_layer(m=6, n=8, seed=12)
    s = Settings(structure="units", method=method)
    quad = surgeon.quadratic(linear_of(W, 8), A.float(), G.float(), s, name="l")
    F = torch.kron(G if method == "kobd" else torch.eye(6, dtype=G.dtype),
                   A if method != "magnitude" else torch.eye(8, dtype=A.dtype))
    for axis in ("rows", "cols"):
        cost = one_layer_units(axis, 2, 6, 8).candidates(quad, s).cost.double()
        for b in range(len(cost)):
            lines = range(2 * b, 2 * b + 2)
            Q = (mask_of(W.shape, rows=lines) if axis == "rows"
                 else mask_of(W.shape, cols=lines)).flatten()
            theta = W.flatten()[Q]
            assert torch.isclose(cost[b], 0.5 * theta @ F[Q][:, Q] @ theta, rtol=1e-5)


def test_the_update_is_the_cut_layers_obs_update_and_dead_lines_zeroed():
    """Two layers: unit u's cut rows in 'a' by OBS, its dead columns of 'b' zeroed alone."""
    W, A, G, A_inv, G_inv = tiny_layer(m=6, n=8, seed=13)
    group = UnitGroup(3, [("a", "rows", 2), ("b", "cols", 2)], [0])
    units = structure([group], a=(6, 8), b=(8, 6))
    taken = units.to_remove("a", torch.tensor([True, False, True]), torch.zeros(3, dtype=torch.long))
    s = Settings(structure="units", damp_a=0, damp_g=0)
    quad = surgeon.quadratic(linear_of(W, 8), A, G, s, name="a")
    new = units.update(quad, taken, None, s, None)
    assert torch.allclose(new, obs(W, A, G, mask_of(W.shape, rows=[0, 1, 4, 5]))[0], atol=1e-10)
    dead = units.to_remove("b", torch.tensor([True, False, True]), torch.zeros(3, dtype=torch.long))
    quad_b = surgeon.quadratic(linear_of(W, 8), A, G, s, name="b")
    new_b = units.update(quad_b, dead, None, s, None)
    keep = [2, 3, 6, 7]
    assert (new_b[:, [0, 1, 4, 5]] == 0).all() and torch.equal(new_b[:, keep], W[:, keep])


def greedy_units(keys, size, own, k, block, target):
    """Brute force: units in order of key (removed ones, every line zero, first), counting the
    weights of each one's lines and a shared block's once all of its k units are taken, from
    what is removed already (removed units, blocks whose units all are), until the target."""
    removed = [not n for n in own]
    order = sorted(range(len(keys)), key=lambda u: (keys[u] if own[u] else -1, u))
    blocks = range(len(own) // k)
    total = sum(size for r in removed if r) + sum(block for b in blocks
                                                  if all(removed[b * k:b * k + k]))
    taken = set()
    for u in order:
        if total >= target and own[u]:
            break
        taken.add(u)
        total += size * (not removed[u])
        b = u // k
        if all(v in taken for v in range(b * k, b * k + k)) and not all(removed[b * k:b * k + k]):
            total += block
    return taken


@pytest.mark.parametrize("order", units_.ORDERS)
@pytest.mark.parametrize("target", [0, 10, 37, 80, 150, 400])
def test_select_counts_shared_grouped_query_lines_with_the_last_of_their_heads(target, order):
    """Six query heads in layer q (10 weights a head), two key-value heads in layer k (4 weights
    each) shared by three each; one head removed already (no nonzero left), the others with a
    few zeros, which count for nothing: the target counts the weights of removed units."""
    gen = torch.Generator().manual_seed(target)
    groups = [UnitGroup(6, [("q", "rows", 1)], [0], [("k", "rows", 1, 3)])]
    units = structure(groups, "cut", order, q=(6, 10), k=(2, 4))
    costs = torch.rand(6, generator=gen)
    own = torch.randint(1, 11, (6,), generator=gen)
    own[4] = 0                                                   # all zero already
    shared = torch.randint(1, 5, (2,), generator=gen)
    cands = [units_.UnitCandidates("q", costs, own),
             units_.UnitCandidates("k", costs[:0], shared)]
    got = units.select(cands, target, 5, surgeon.Runtime())
    keys = (costs / 10 if order == "per-weight" else costs).tolist()   # one size: the same order
    want = greedy_units(keys, 10, own.tolist(), 3, 4, target)
    assert sorted(got[0][("rows", "cut")].tolist()) == sorted(want)
    dead_kv = [b for b in range(2) if all(u in want for u in range(3 * b, 3 * b + 3))]
    assert got[1].get(("rows", "dead"), torch.zeros(0)).tolist() == dead_kv


def test_per_weight_order_takes_the_cheapest_per_weight_first():
    """Two groups in one layer: units of 2 lines (20 weights) and of 1 line (10 weights); by
    cost a unit of 1 line goes first, by cost per weight one of 2 lines."""
    groups = [UnitGroup(2, [("a", "rows", 2)], [0]), UnitGroup(2, [("b", "rows", 1)], [0])]
    costs = torch.tensor([3.0, 5.0, 2.0, 4.0])          # per weight: 0.15, 0.25, 0.2, 0.4
    nonzero = torch.tensor([20, 20, 10, 10])
    for order, first in (("cost", ("b", 0)), ("per-weight", ("a", 0))):
        units = structure(groups, "cut", order, a=(4, 10), b=(2, 10))
        cands = [units_.UnitCandidates("a", costs[:2], nonzero[:2]),
                 units_.UnitCandidates("b", costs[2:], nonzero[2:])]
        got = units.select(cands, 1, 0, surgeon.Runtime())   # one unit: the first in order
        layer, unit = first
        taken = got[0 if layer == "a" else 1][("rows", "cut")].tolist()
        width = 2 if layer == "a" else 1
        assert taken == list(range(unit * width, unit * width + width)), order


@pytest.mark.parametrize("make", [tiny_opt, tiny_llama,
                                  lambda: tiny_llama(hidden=32, heads=4, kv_heads=4),
                                  lambda: tiny_llama(hidden=32, heads=4, kv_heads=2)])
@pytest.mark.parametrize("method", surgeon.METHODS)
def test_units_reach_the_target_and_go_whole(make, method):
    """Every shot on its target to one unit; every unit keeps all its lines or none; the
    compacted model computes the same and keeps no zero line."""
    model = make()
    groups = units_.find(model)
    layers = surgeon.prunable_layers(model)
    total = sum(layer.weight.numel() for layer in layers.values())
    biggest = max(sum(w * (layers[l].in_features if a == "rows" else layers[l].out_features)
                      for l, a, w in [*g.lines, *(x[:3] for x in g.shared)]) for g in groups)
    shots = []
    surgeon.prune(model, calib(), Settings(sparsity=0.3, structure="units", shots=3,
                                           method=method, lora_steps=2),
                  on_shot=shots.append, structure=units_.Units(groups, layers))
    for t, shot in enumerate(shots, 1):
        assert 0.1 * t - 1e-9 <= shot["sparsity"] <= 0.1 * t + biggest / total, t
    for g in groups:
        for u in range(g.count):
            gone = [bool(((layers[l].weight[u * w:(u + 1) * w] if a == "rows"
                           else layers[l].weight[:, u * w:(u + 1) * w]) == 0).all())
                    for l, a, w in g.lines]
            assert all(gone) or not any(gone), (g.lines, u, gone)
    x = torch.randint(0, 50, (2, 10))
    with torch.no_grad():
        before = model(x).logits
        report = compact.compact(model)
        assert torch.allclose(model(x).logits, before, atol=1e-5)
    assert report["zeros_kept"] == 0 and report["zero_columns_kept"] == 0


def test_units_need_their_groups_and_lines_that_fit():
    model = tiny_llama()
    with pytest.raises(ValueError, match="units.py"):
        surgeon.prune(model, calib(), Settings(sparsity=0.2, structure="units"))
    with pytest.raises(ValueError, match="found no heads or MLP units"):
        units_.prune(torch.nn.Sequential(torch.nn.Embedding(50, 8), torch.nn.Linear(8, 50)),
                     calib(), Settings(sparsity=0.2, structure="units"))
    bad = [UnitGroup(7, [("model.layers.0.mlp.gate_proj", "rows", 1)], [0])]
    with pytest.raises(ValueError, match="do not match a prunable layer"):
        units_.Units(bad, surgeon.prunable_layers(model))
    with pytest.raises(ValueError, match="prunes structure 'units'"):
        units_.prune(model, calib(), Settings(sparsity=0.2, structure="rowcol"))


def test_uneven_grouped_query_heads_compact_and_load_with_from_pretrained(tmp_path):
    """Block 0 loses query head 0 (its key-value head keeps one query head, the other two):
    uneven groups, read through the k/v expansion; block 1 loses a whole group. The saved
    folder loads with plain from_pretrained(trust_remote_code=True) to the same logits."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    files = make_files(tmp_path / "files")
    model = tiny_llama(vocab=300, hidden=32, heads=4, kv_heads=2)
    d = 8
    with torch.no_grad():
        model.model.layers[0].self_attn.o_proj.weight[:, 0:d] = 0
        model.model.layers[1].self_attn.o_proj.weight[:, 2 * d:4 * d] = 0
    ids = torch.randint(0, 300, (2, 12))
    with torch.no_grad():
        before = model(ids).logits
        report = compact.compact(model)
        after = model(ids).logits
    assert report["heads_removed"] == 3 and torch.allclose(after, before, atol=1e-5)
    first, second = (model.model.layers[i].self_attn for i in (0, 1))
    assert first.kv_index == [0, 1, 1] and first.k_proj.out_features == 2 * d
    assert second.kv_index is None and second.num_key_value_groups == 2
    assert second.k_proj.out_features == d and second.q_proj.out_features == 2 * d
    compact.save(model, AutoTokenizer.from_pretrained(files / "llama"), tmp_path / "saved",
                 report["shapes"])
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "saved", trust_remote_code=True)
    with torch.no_grad():
        assert torch.allclose(plain(ids).logits, after, atol=1e-6)


def test_unit_cost_lines_sums_every_line_and_still_updates_through_the_cheapest_cut():
    """Two layers: unit u's rows in 'a' (a cut) and its columns in 'b' (a cut): "cut" prices a
    unit at the cheaper of the two, "lines" at their sum; the update goes through the cheaper."""
    W, A, G, _, _ = tiny_layer(m=6, n=8, seed=14)
    s = Settings(structure="units", damp_a=0.3, damp_g=0.2)
    group = UnitGroup(3, [("a", "rows", 2), ("b", "cols", 2)], [0, 1])
    quads = {"a": surgeon.quadratic(linear_of(W, 8), A, G, s, name="a"),
             "b": surgeon.quadratic(linear_of(W.T.contiguous(), 6), G, A, s, name="b")}
    rows = structure([group], a=(6, 8), b=(8, 6)).candidates(quads["a"], s).cost
    cols = structure([group], a=(6, 8), b=(8, 6)).candidates(quads["b"], s).cost
    for mode, want in (("cut", torch.minimum(rows, cols)), ("lines", rows + cols)):
        units = structure([group], mode, a=(6, 8), b=(8, 6))
        cands = [units.candidates(quads[n], s) for n in ("a", "b")]
        cheapest = int(want.argmin())
        taken = units.select(cands, 1, 0, surgeon.Runtime())   # one unit: the cheapest
        side = ("a", ("rows", "cut")) if rows[cheapest] <= cols[cheapest] else \
            ("b", ("cols", "cut"))
        got = taken[0 if side[0] == "a" else 1][side[1]].tolist()
        assert got == [2 * cheapest, 2 * cheapest + 1], mode


def test_unit_cost_must_be_cut_or_lines():
    with pytest.raises(ValueError, match="unit_cost must be 'cut' or 'lines'"):
        units_.Units(units_.find(tiny_opt()), surgeon.prunable_layers(tiny_opt()), "sum")


@pytest.mark.parametrize("make", [tiny_opt, lambda: tiny_llama(vocab=300, hidden=32, heads=4,
                                                                kv_heads=2)])
@pytest.mark.parametrize("multiple", [1, 8, 48])
def test_compaction_pads_mlps_to_a_multiple_and_reloads(make, multiple, tmp_path):
    """Block 0 loses 3 units, block 1 none: with `multiple` each MLP is padded with zero units
    to a multiple of it (48: wider than the model was), the logits stay, and the saved folder
    loads with from_pretrained(trust_remote_code=True) to the same shapes and logits."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = make()
    mlps = [m for m in model.modules() if units_.kind_of(m) in ("ungated", "gated")]
    down = [units_.mlp_of(m, units_.kind_of(m))[1] for m in mlps]
    width = down[0].in_features
    with torch.no_grad():
        down[0].weight[:, [1, 4, 7]] = 0
    ids = torch.randint(0, 50, (2, 12))
    with torch.no_grad():
        before = model(ids).logits
        report = compact.compact(model, multiple)
        after = model(ids).logits
    widths = [d.in_features for d in down]
    assert widths == [-(-(width - 3) // multiple) * multiple, -(-width // multiple) * multiple]
    assert report["mlp_units_removed"] == 3
    assert report["mlp_units_padded"] == sum(widths) - (2 * width - 3)
    assert torch.allclose(after, before, atol=1e-5)
    files = make_files(tmp_path / "files")
    kind = "opt" if hasattr(mlps[0], "fc1") else "llama"
    compact.save(model, AutoTokenizer.from_pretrained(files / kind), tmp_path / "saved",
                 report["shapes"])
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "saved", trust_remote_code=True)
    assert compact.shapes(plain)["linear"] == report["shapes"]["linear"]
    with torch.no_grad():
        assert torch.allclose(plain(ids).logits, after, atol=1e-6)


def test_a_saved_folder_has_the_code_compaction_ran_with_even_if_the_file_changed(tmp_path,
                                                                                   monkeypatch):
    """compact.py is edited on disk while a run goes on (lines shift): the modeling file the run
    saves still holds the functions it imported, and the folder loads."""
    import importlib
    import shutil
    import sys
    from transformers import AutoModelForCausalLM, AutoTokenizer
    copy = tmp_path / "code"
    copy.mkdir()
    shutil.copy(compact.__file__, copy / "compact.py")
    monkeypatch.syspath_prepend(str(copy))
    monkeypatch.delitem(sys.modules, "compact")
    running = importlib.import_module("compact")
    assert running.__file__ == str(copy / "compact.py")
    source = (copy / "compact.py").read_text()
    (copy / "compact.py").write_text("# an edit\n" * 40 + source)
    model = tiny_llama(vocab=300, hidden=32, heads=4, kv_heads=2)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[:, :5] = 0
        report = running.compact(model)
        ids = torch.randint(0, 300, (2, 12))
        want = model(ids).logits
    files = make_files(tmp_path / "files")
    running.save(model, AutoTokenizer.from_pretrained(files / "llama"), tmp_path / "saved",
                 report["shapes"])
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "saved", trust_remote_code=True)
    with torch.no_grad():
        assert torch.allclose(plain(ids).logits, want, atol=1e-6)


@pytest.mark.parametrize("make", [tiny_opt, lambda: tiny_llama(hidden=32, heads=4, kv_heads=2)])
def test_the_target_counts_what_compaction_removes_whatever_zeros_were_there(make):
    """8% of every weight matrix zero before pruning: units at 30% still remove 30% of the
    blocks' weights (to one unit), which compaction then cuts out, exactly."""
    from conftest import with_exact_zeros
    model = with_exact_zeros(make(), 0.08)
    layers = surgeon.prunable_layers(model)
    total = sum(layer.weight.numel() for layer in layers.values())
    structure_ = units_.structure(model)
    biggest = int(structure_.size.max()) + max(structure_.shared_size.values(), default=0)
    assert structure_.removed_weights(layers) == 0
    units_.prune(model, calib(), Settings(sparsity=0.3, structure="units", shots=2))
    removed = structure_.removed_weights(layers)
    assert 0.3 * total - 0.5 <= removed <= 0.3 * total + biggest
    compact.compact(model)
    left = sum(layer.weight.numel() for layer in surgeon.prunable_layers(model).values())
    assert total - left == removed


@pytest.mark.parametrize("make", [tiny_opt, tiny_llama])
def test_an_mlp_that_empties_first_is_cut_to_zero_width_and_reloads(make, tmp_path):
    """Block 0's MLP loses every unit, block 1's none: compaction cuts block 0's MLP to zero
    width, the logits stay, and the saved folder loads with from_pretrained to the same."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    files = make_files(tmp_path / "files")
    model = make()
    mlp = model.model.layers[0].mlp if make is tiny_llama else model.model.decoder.layers[0]
    with torch.no_grad():
        (mlp.down_proj if make is tiny_llama else mlp.fc2).weight.zero_()
    ids = torch.randint(0, 50, (2, 12))
    with torch.no_grad():
        before = model(ids).logits
        report = compact.compact(model)
        assert torch.allclose(model(ids).logits, before, atol=1e-6)
    assert (mlp.down_proj if make is tiny_llama else mlp.fc2).in_features == 0
    tokenizer = AutoTokenizer.from_pretrained(files / ("llama" if make is tiny_llama else "opt"))
    compact.save(model, tokenizer, tmp_path / "saved", report["shapes"])
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "saved", trust_remote_code=True)
    with torch.no_grad():
        assert torch.allclose(plain(ids).logits, before, atol=1e-6)


@pytest.mark.parametrize("make", [tiny_opt, tiny_llama])
def test_an_attention_without_heads_is_skipped_and_generates_the_same(make):
    """Block 0's every head dead: compaction leaves it no head and skips it; the logits and
    greedy generation with a cache stay the same."""
    model = make()
    blocks = model.model.layers if make is tiny_llama else model.model.decoder.layers
    attn = blocks[0].self_attn
    with torch.no_grad():
        units_.output_of(attn).weight.zero_()
    model.config.use_cache = True
    ids = torch.randint(0, 50, (2, 12))
    with torch.no_grad():
        before = model(ids).logits
        tokens = model.generate(ids[:1, :5], max_new_tokens=6, do_sample=False)
        report = compact.compact(model)
        assert torch.allclose(model(ids).logits, before, atol=1e-6)
        assert torch.equal(model.generate(ids[:1, :5], max_new_tokens=6, do_sample=False), tokens)
    assert report["heads_removed"] == 2 and attn.q_proj.out_features == 0

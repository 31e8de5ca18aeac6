"""Several processes (torch.distributed, gloo, one thread a rank; the calibration windows shared
out) give the single process's weights bit for bit: every structure, method, low-rank steps, existing zeros; and run_opt.py
under torchrun, killed and resumed. Nothing is downloaded."""
import itertools
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import scale
import surgeon
import units
from surgeon import LINES, Settings
from conftest import calib, make_files, tiny_llama, tiny_opt, with_exact_zeros


STRUCTURES = [("unstructured", 0.5), ("2:4", 0.5), ("4:8", 0.4), ("rowcol", 0.3), ("units", 0.3)]
CONFIGS = [(make, structure, sparsity, method, 0.0)
           for make, (structure, sparsity), method in itertools.product(
               ("opt", "llama"), STRUCTURES, surgeon.METHODS)] + \
          [(make, structure, sparsity, "surgeon", 0.05)
           for make, (structure, sparsity) in itertools.product(("opt", "llama"), STRUCTURES)]


def pruned(config):
    """The parameters after pruning one configuration (2 shots; 2 low-rank steps a shot for
    rows and columns and units), and each shot's record."""
    make, structure, sparsity, method, zeros = config
    model = {"opt": tiny_opt, "llama": tiny_llama}[make]()
    if zeros:
        with_exact_zeros(model, zeros)
    records = []
    scale.prune(model, calib(), Settings(sparsity=sparsity, structure=structure, method=method,
                                         shots=2, lora_steps=2 if structure in LINES else 0),
                on_shot=records.append,
                structure=units.structure(model) if structure == "units" else None)
    return [p.detach().clone() for p in model.parameters()], [r["sparsity"] for r in records]


def worker(rank, size, store, out, configs):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=size)
    try:
        torch.save({config: pruned(config) for config in configs}, f"{out}.{rank}")
        dist.barrier()                          # no rank leaves gloo while another still works
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def single():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return {config: pruned(config) for config in CONFIGS}
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("size", [2, 3])
def test_ranks_give_the_single_process_weights_bit_for_bit(tmp_path, single, size):
    """Every configuration with 2 ranks; the Llama ones with 3 (each rank then owns a few
    layers of the 14, some a single block's)."""
    configs = CONFIGS if size == 2 else [c for c in CONFIGS if c[0] == "llama"]
    mp.spawn(worker, args=(size, str(tmp_path / "store"), str(tmp_path / "out"), configs),
             nprocs=size)
    for rank in range(size):
        got = torch.load(tmp_path / f"out.{rank}")
        for config in configs:
            (weights, sparsity), (want, want_sparsity) = got[config], single[config]
            assert sparsity == want_sparsity, (rank, config)
            assert all(torch.equal(a, b) for a, b in zip(weights, want)), (rank, config)


def half_unstructured(windows):
    """Tiny Llama's weights after 2 shots to 50% unstructured on `windows` windows."""
    model = tiny_llama()
    scale.prune(model, calib(n=windows), Settings(sparsity=0.5, structure="unstructured", shots=2))
    return [p.detach() for p in model.parameters()]


def few_windows(rank, size, store, out, windows, overlap_on):
    """half_unstructured on each rank; the ranks in overlap_on overlap the terms' exchange
    with the next round, the others add them first."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=size)
    scale.Ranks.overlaps = staticmethod(lambda terms, device: rank in overlap_on)
    try:
        torch.save(half_unstructured(windows), f"{out}.{rank}")
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("size,windows,overlap_on", [(3, 2, (0, 1, 2)), (2, 5, (0,))])
def test_few_windows_and_the_exchange_overlapped_or_not(tmp_path, size, windows, overlap_on):
    """3 ranks, 2 calibration windows: rank 2 runs none, and owns layers all the same. 2 ranks,
    5 windows (3 rounds, the last one window): rank 0 runs its next window while a round's
    terms travel, rank 1 adds them first. Each the single process's weights bit for bit."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        want = half_unstructured(windows)
    finally:
        torch.set_num_threads(threads)
    mp.spawn(few_windows, args=(size, str(tmp_path / "store"), str(tmp_path / "out"), windows,
                                overlap_on), nprocs=size)
    for rank in range(size):
        got = torch.load(tmp_path / f"out.{rank}")
        assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_rounds_overlap_where_twice_a_window_of_terms_leaves_a_quarter_free(monkeypatch):
    terms = {("x", "a"): torch.zeros(1000, 250)}                         # 1 MB
    for free, total, expected in ((3.0e6, 4e6, True), (2.9e6, 4e6, False)):
        monkeypatch.setattr(scale, "memory", lambda device: (free, total))
        assert scale.Ranks.overlaps(terms, torch.device("cpu")) is expected
    monkeypatch.setattr(scale, "memory", lambda device: None)
    assert not scale.Ranks.overlaps(terms, torch.device("cpu"))


@pytest.mark.parametrize("size", [2, 3, 8])
def test_layers_are_owned_in_contiguous_balanced_shares(monkeypatch, size):
    for name, value in (("is_initialized", True), ("get_world_size", size), ("get_rank", 1),
                        ("get_backend", "gloo")):
        monkeypatch.setattr(dist, name, lambda value=value: value)
    layers = surgeon.prunable_layers(tiny_llama(layers=4, hidden=32))
    ranks = scale.Ranks(layers)
    shares = list(ranks.owner.values())
    assert shares == sorted(shares) and set(shares) == set(range(size))  # contiguous, all used
    factor = {n: (l.in_features + 1) ** 2 + l.out_features ** 2 for n, l in layers.items()}
    per_rank = [sum(factor[n] for n in layers if ranks.owner[n] == r) for r in range(size)]
    assert max(per_rank) - sum(per_rank) / size <= max(factor.values())   # balanced
    assert list(ranks.own(layers)) == [n for n in layers if ranks.owner[n] == 1]


def failing_worker(rank, size, store, out):
    """Rank 1 meets a non-finite curvature in one of its layers; every rank must end with it."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=size)
    real = scale.check_finite

    def check_finite(factors):
        if rank == 1:
            raise ValueError(f"non-finite curvature A (inputs) in layer {next(iter(factors))}")
        return real(factors)
    scale.check_finite = check_finite
    try:
        scale.prune(tiny_llama(), calib(), Settings(sparsity=0.3, structure="unstructured",
                                                    shots=2))
        message = "no error"
    except ValueError as err:
        message = str(err)
    try:
        dist.barrier()
    finally:
        dist.destroy_process_group()
    with open(f"{out}.{rank}", "w") as f:
        f.write(message)


def test_an_error_on_one_rank_ends_every_rank(tmp_path):
    mp.spawn(failing_worker, args=(2, str(tmp_path / "store"), str(tmp_path / "out")), nprocs=2)
    own, other = ((tmp_path / f"out.{r}").read_text() for r in (1, 0))
    assert own.startswith("non-finite curvature A (inputs) in layer model.layers.1.")
    assert other.startswith("rank 1: non-finite curvature A (inputs) in layer model.layers.1.")


# ---------------------------------------------------------------------------------------------
# run_opt.py under torchrun


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return make_files(tmp_path_factory.mktemp("torchrun"))


def command(files, *extra):
    return ["--model", str(files / "llama"), "--train-file", str(files / "train.txt"),
            "--test-file", str(files / "test.txt"), "--nsamples", "4", "--seqlen", "32",
            "--eval-windows", "4", "--device", "cpu", "--structure", "rowcol", "--sparsity",
            "0.3", "--shots", "3", *extra]


def torchrun(args, nproc=2, **kwargs):
    import subprocess
    import sys
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node",
                             str(nproc), "run_opt.py", *args], env=env, text=True,
                            cwd=os.path.dirname(os.path.abspath(__file__)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


@pytest.fixture(scope="module")
def one_process(files, tmp_path_factory):
    import run_opt
    out = tmp_path_factory.mktemp("one")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        record = run_opt.main(command(files, "--save", str(out / "model"), "--eval-every", "1"))
    finally:
        torch.set_num_threads(threads)
    return record, weights(out / "model")


def weights(folder):
    from safetensors.torch import load_file
    return load_file(os.path.join(folder, "model.safetensors"))


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_torchrun_gives_the_single_process_result(files, tmp_path, one_process):
    import json
    proc = torchrun(command(files, "--save", str(tmp_path / "model"), "--json",
                            str(tmp_path / "record.json"), "--eval-every", "1"))
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-3000:]
    record, want = one_process
    assert same(weights(tmp_path / "model"), want)
    got = json.loads((tmp_path / "record.json").read_text())
    assert got["provenance"]["world_size"] == 2 and len(got["peak_memory_mb_ranks"]) == 2
    assert [s["ppl"] for s in got["shots"]] == [s["ppl"] for s in record["shots"]]
    assert out.count("perplexity: dense") == 1                         # rank 0 alone prints


def test_torchrun_killed_and_resumed_gives_the_same_weights(files, tmp_path, one_process):
    import signal
    import time
    ckpt = tmp_path / "ckpt" / "checkpoint.pt"
    args = command(files, "--save", str(tmp_path / "model"), "--checkpoint",
                   str(tmp_path / "ckpt"), "--eval-every", "1")
    proc = torchrun(args)
    deadline = time.time() + 180
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)                        # as a scheduler's time limit does
    out, err = proc.communicate(timeout=120)
    assert ckpt.exists() and not (tmp_path / "model").exists(), err[-3000:]
    resumed = torchrun(args + ["--resume"])
    out, err = resumed.communicate(timeout=240)
    assert resumed.returncode == 0, err[-3000:]
    assert "resuming from" in out
    assert same(weights(tmp_path / "model"), one_process[1])


def test_torchrun_refuses_bad_input_before_the_process_group_starts(files, tmp_path):
    proc = torchrun(command(files, "--structure", "2:3", "--sparsity", "0.5"))
    out, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert errors == ["error: 2:3 needs input widths divisible by 3; not so for "
                      "['model.layers.0.self_attn.q_proj', 'model.layers.0.self_attn.k_proj', "
                      "'model.layers.0.self_attn.v_proj']"], err[-2000:]


def test_torchrun_with_a_device_map_is_refused(files, tmp_path):
    proc = torchrun(command(files, "--device-map", "auto"))
    out, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "error: --device-map cannot be used with several processes" in err


@pytest.mark.parametrize("extra", [("--json", "{tmp}/missing/record.json"),
                                   ("--save", "{tmp}/file.txt")])
def test_torchrun_with_a_bad_output_path_ends_every_rank_within_seconds(files, tmp_path, extra):
    """Rank 0 alone writes the outputs, but every rank checks them: none is left waiting in
    init_process_group for a rank 0 that has gone (torchrun then killed it after ~30 s)."""
    import time
    (tmp_path / "file.txt").write_text("mine")
    tic = time.time()
    proc = torchrun(command(files, *(e.format(tmp=tmp_path) for e in extra)))
    out, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and time.time() - tic < 25, err[-2000:]
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and extra[0] in errors[0], err[-2000:]
    assert "SIGKILL" not in err and (tmp_path / "file.txt").read_text() == "mine"

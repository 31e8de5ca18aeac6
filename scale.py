"""LLM Surgeon at scale: surgeon.py's computation, checked, faster and over several processes.

`prune` is surgeon.prune with everything here, and what run_opt.py runs:

  1. checks before a weight is touched, precision, failure notes and memory notes
  2. fast kernels, each the same computation as its plain version in surgeon.py (the tests hold
     them to it): the Gram sums of KFAC as upper blocks, element updates collected over blocks of
     rows (as SparseGPT) and solved through the kept weights where a row removes most of them,
     the global threshold as a radix select, a flat gather
  3. the runtimes (surgeon.py section 8): `Fast`, one process with the fast kernels, and `Ranks`,
     several processes of torch.distributed, each running a share of the calibration windows
     and owning a share of the layers
  4. access to the weights of layers that accelerate keeps off the device (in host memory or on
     disk), for a model placed with a device map

Memory. A shot holds the model, the factors (float32, one A per input tensor that several layers
read, on `curvature_device`), one float32 cost per candidate, and the float64 workspace of one
layer at a time; each layer's quadratic model (W~ and its inverses) is kept from the costs to
the update while a quarter of the device's memory stays free (`keeps`), else computed again.
With several processes, each also holds one window's terms of every layer as they are recorded,
and where memory allows, about twice as much from the round before while it is exchanged.
"""
import itertools
import math
from contextlib import contextmanager

import torch
import torch.nn as nn

import surgeon
from surgeon import REMOVED, NM, Settings


# ----------------------------------------------------------------------------------------------
# 1. Checks, precision, notes


def check(settings: Settings, layers=None, batches=None, structure=None):
    """Raise ValueError for anything that would fail later, before a weight is touched. Without
    layers and batches, checks the settings alone; structure: the one that prunes, where it is
    not settings.structure's (units.py's)."""
    cfg = settings
    if structure is None and cfg.structure != "units":
        structure = surgeon.structure_of(cfg.structure)
    if cfg.method not in surgeon.METHODS:
        raise ValueError(f"method must be one of {surgeon.METHODS}, got {cfg.method!r}")
    if not 0 <= cfg.sparsity < 1:
        raise ValueError(f"sparsity must be in [0, 1), got {cfg.sparsity}")
    for name, low, strict in (("shots", 1, False), ("max_correlate", 1, False),
                              ("damp_a", 0, False), ("damp_g", 0, False),
                              ("lora_steps", 0, False), ("lora_rank", 1, False),
                              ("lora_lr", 0, True)):
        value = getattr(cfg, name)
        if not (math.isfinite(value) and (value > low if strict else value >= low)):
            raise ValueError(f"{name} must be a finite number {'>' if strict else '>='} {low}, "
                             f"got {value}")
    nm = structure if isinstance(structure, NM) else None
    if nm and cfg.sparsity > nm.N / nm.M:
        raise ValueError(f"{nm.name} removes at most {nm.N}/{nm.M} of the weights; sparsity "
                         f"{cfg.sparsity} cannot be met")
    if cfg.curvature_device is not None:
        check_device(cfg.curvature_device)
    if layers is None:
        return
    if not layers:
        raise ValueError("the model has no prunable nn.Linear layers")
    odd = [name for name, layer in layers.items() if nm and layer.in_features % nm.M]
    if odd:
        raise ValueError(f"{nm.name} needs input widths divisible by {nm.M}; not so for {odd[:3]}")
    needs_data = cfg.method != "magnitude" or cfg.lora_steps > 0
    if needs_data and cfg.sparsity > 0 and len(batches) == 0:
        raise ValueError("calibration data is empty")


def check_device(name: str) -> torch.device:
    """A torch.device that exists here (a tensor can be made on it), or ValueError."""
    try:
        return torch.empty(0, device=name).device
    except (RuntimeError, AssertionError):
        raise ValueError(f"device {name!r} is not available here (cpu, cuda, cuda:1, ...)"
                         f"{'' if torch.cuda.is_available() else '; torch sees no CUDA'}") from None


def check_finite(factors):
    for name, (A, G) in factors.items():
        for X, what in ((A, "A (inputs)"), (G, "G (output gradients)")):
            if not torch.isfinite(X).all():
                raise ValueError(f"non-finite curvature {what} in layer {name}: check the model "
                                 "and data (float32?), or increase the damping")


def factor_bytes(layers: dict[str, nn.Linear], source: dict | None = None) -> int:
    """float32 bytes of all factors: one G per layer, one A per distinct input, where source maps
    a layer to the layer whose input it reads (default: its own, an upper bound)."""
    source = source or {}
    A_width = {source.get(name, name): layer.in_features + (layer.bias is not None)
               for name, layer in layers.items()}
    return 4 * (sum(k * k for k in A_width.values())
                + sum(layer.out_features ** 2 for layer in layers.values()))


@contextmanager
def factor_memory_note(rec, layers, device):
    """Out of memory while the factors accumulate: how much they take, and what to do."""
    try:
        yield
    except torch.OutOfMemoryError as err:
        rec.last = (None, None)
        need = factor_bytes(layers, rec.source) / 2**30
        raise MemoryError(f"out of memory on {device} while accumulating the curvature factors, "
                          f"which take about {need:.1f} GiB there (at most); keep them in host "
                          "memory with curvature_device='cpu' (--curvature-device cpu)") from err


KEEP_FREE = 0.25            # the share of a device's memory that kept quadratic models leave free


def memory(device) -> tuple[int, int] | None:
    """(free, total) bytes of the device now: CUDA's, or Linux's MemAvailable and MemTotal."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
        return info["MemAvailable"], info["MemTotal"]
    except (OSError, KeyError, ValueError, IndexError):
        return None


def quadratic_bytes(quad) -> int:
    return sum(t.numel() * t.element_size() for t in vars(quad).values()
               if isinstance(t, torch.Tensor))


def keeps(quad) -> bool:
    """Whether a layer's quadratic model (W~, A_inv, G_inv, ...: quadratic_bytes) stays in memory
    from the costs to the update, so that its inverses are computed once a shot instead of
    twice: where there are inverses, and the device keeps KEEP_FREE of its memory free after
    it, and room for twice the model (the update's work)."""
    if quad.A_inv is None and quad.G_inv is None:
        return False
    free_total = memory(quad.W.device)
    need = quadratic_bytes(quad)
    return free_total is not None and free_total[0] - 3 * need >= KEEP_FREE * free_total[1]


@contextmanager
def highest_precision():
    """float32 matrix products in full precision (no TF32 on CUDA) inside, as before outside."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


@contextmanager
def failure_note(layers, shots, done):
    """An error inside a shot gets a note: which shot, and how much of the model is zero now.
    done: a list whose last item is the last shot done."""
    try:
        yield
    except Exception as err:
        err.add_note(f"shot {done[-1] + 1} of {shots} failed; "
                     f"{surgeon.overall_sparsity(layers):.1%} of the weights are zero now")
        raise


# ----------------------------------------------------------------------------------------------
# 2. Fast kernels


GRAM_BLOCKS = 4             # a symmetric sum is accumulated as 10 of its 4 x 4 blocks
LAZY_ROWS = 128             # rows whose element updates are collected before W is updated


def add_gram(S: torch.Tensor, x: torch.Tensor):
    """S += x^T x for x (tokens, d), the upper block triangle only; `mirror` completes S once at
    the end."""
    step = -(-S.shape[0] // GRAM_BLOCKS)
    for i in range(0, S.shape[0], step):
        S[i:i + step, i:].addmm_(x[:, i:i + step].T, x[:, i:])


def mirror(S: torch.Tensor) -> torch.Tensor:
    step = -(-len(S) // GRAM_BLOCKS)
    for i in range(0, len(S), step):
        S[i + step:, i:i + step] = S[i:i + step, i + step:].T
    return S


class FastRecorder(surgeon.Recorder):
    """surgeon.Recorder with the blocked Gram sums."""

    def add_gram(self, sums, key, z):
        if key not in sums:
            sums[key] = z.new_zeros(z.shape[1], z.shape[1])
        add_gram(sums[key], z)

    def gram(self, S):
        return mirror(S)


class Terms(FastRecorder):
    """A window's terms of the sums, kept instead of added: ("x", source) -> labelled inputs,
    ("g", layer) -> output gradients (Ranks.factors sends them to the layers' owners)."""

    def __init__(self, device):
        super().__init__(device)
        self.terms = {}

    def add_input(self, name, x):
        self.terms["x", name] = x

    def add_gram(self, sums, key, z):                      # the output gradients'
        self.terms["g", key] = z


def remove_elements_lazily(W, A_inv, G_inv, mask, max_correlate):
    """surgeon.remove_elements, as in SparseGPT: a block of up to LAZY_ROWS rows collects its
    updates Y = E A_inv (as rows of the update direction), brings each chunk's w_Q up to date
    from them, and updates W with one product at the end. A row alone in its chunk is solved
    with its own Cholesky factor (`row_update`), and through its kept weights where it removes
    more of its live weights than it keeps: min(|Q|, |F|)^3 / 3 flops a row. Each row's index
    sets are found once a layer; the factorizations are checked once a block."""
    W, A_inv = W.to(G_inv.dtype).clone(), A_inv.contiguous()       # gathered by `submatrix`
    live = A_inv.diagonal() > 0
    solve = mask & (G_inv.diagonal()[:, None] > 0) & live[None, :]
    counts, n_live = solve.sum(1).tolist(), int(live.sum())
    removed = solve.nonzero()[:, 1].split(counts)                         # each row's Q
    chunks = surgeon.row_chunks(counts, max_correlate)
    through = {R[0] for R in chunks if len(R) == 1 and 2 * counts[R[0]] > n_live}
    A = kept = None
    if through:
        A = torch.zeros_like(A_inv)                              # A on the live columns
        idx = live.nonzero()[:, 0]
        A[idx[:, None], idx] = torch.cholesky_inverse(torch.linalg.cholesky(submatrix(A_inv, idx)))
        kept = (live & ~solve).nonzero()[:, 1].split([n_live - c for c in counts])   # each F
    while chunks:
        block = [chunks.pop(0)]
        while chunks and sum(len(R) for R in block) + len(chunks[0]) <= LAZY_ROWS:
            block.append(chunks.pop(0))
        rows = torch.tensor([i for R in block for i in R], device=W.device)    # block rows
        G_B = G_inv[:, rows]                                                    # (m, |B|)
        Y = W.new_zeros(len(rows), W.shape[1])                                  # (|B|, k)
        info, start = torch.zeros((), dtype=torch.int32), 0
        for R in block:
            b, start = start, start + len(R)
            if len(R) == 1:
                i, j = R[0], removed[R[0]]
                w = (W[i] - G_B[i, :b] @ Y[:b])[j]                           # w_Q as updated
                Y[b], info = row_update(w, j, G_inv[i, i], A_inv, A, kept[i] if i in through
                                        else None, info)
            else:
                r, j = solve[R].nonzero(as_tuple=True)                          # Q in chunk R
                i = rows[b:start][r]
                w = W[i, j] - (G_B[R][:, :b] @ Y[:b])[r, j]
                Y[b:start] = chunk_update(w, i, j, r, len(R), A_inv, G_inv)
        if info.item():
            raise ValueError("correlated update is not positive definite; increase the damping")
        W -= G_B @ Y                                                            # -G_inv E A_inv
    W[mask] = 0
    return W


def row_update(w, j, g, A_inv, A, f, info):
    """(k,): one row's E A_inv (Eq. 7-8 with C = g A_inv[Q, Q]), E = C^-1 w_Q on Q; with the
    row's kept live columns f given, through them: y_Q = w_Q / g and y_F = -A[F, F]^-1 A[F, Q]
    w_Q / g (the inverse of a block of an inverse). Adds the Cholesky's failure to info."""
    if f is None:
        U, bad = torch.linalg.cholesky_ex(submatrix(A_inv, j), upper=True)
        E = w.new_zeros(len(A_inv))
        E[j] = torch.cholesky_solve(w[:, None], U, upper=True)[:, 0] / g          # C^-1 w_Q
        return A_inv @ E, info + bad                                          # A_inv symmetric
    y = w.new_zeros(len(A_inv))
    y[j] = w
    if len(f):
        U, bad = torch.linalg.cholesky_ex(submatrix(A, f), upper=True)
        A_FQ = A.reshape(-1).take(f[:, None] * A.shape[1] + j)                  # (|F|, |Q|)
        y[f] = -torch.cholesky_solve((A_FQ @ w)[:, None], U, upper=True)[:, 0]
        info = info + bad
    return y / g, info


def chunk_update(w, i, j, r, n_rows, A_inv, G_inv):
    """(n_rows, k): the rows of E A_inv of a chunk of several rows (Eq. 7-8), E = C^-1 w_Q."""
    C = submatrix(G_inv, i) * A_inv[j][:, j]                                    # Eq. 7
    E = w.new_zeros(n_rows, len(A_inv))
    E[r, j] = torch.cholesky_solve(w[:, None], cholesky(C), upper=True)[:, 0]   # C^-1 w_Q
    return E @ A_inv


def cholesky(C):
    """The upper factor of C = U^T U."""
    U, info = torch.linalg.cholesky_ex(C, upper=True)
    if info.item():
        raise ValueError("correlated update is not positive definite; increase the damping")
    return U


def submatrix(X, idx):
    """X[idx][:, idx]; a flat `take` is the fastest gather of it on CPU."""
    return X.reshape(-1).take(idx[:, None] * X.shape[1] + idx)


def radix_select(costs, gains, target, zeros, rt):
    """surgeon.threshold_select without a sort or a copy of ~1e9 costs: a radix select on the
    float32 bit patterns (4 passes) finds the threshold thr; everything below it is taken, then
    ties at thr in order until the target. Several processes (rt) sum the histograms and counts
    (exact: they count weights); the ties go in layer order, process after process."""
    def total(x):
        return float(rt.sum(torch.tensor(float(x), dtype=torch.float64)))

    forced = [c == REMOVED for c in costs]
    need = target - zeros - total(sum(int(gn[f].sum()) for gn, f in zip(gains, forced)))
    if need <= 0:
        return forced
    if total(sum(int(gn[~f].sum()) for gn, f in zip(gains, forced))) <= need:
        return [torch.ones_like(f) for f in forced]            # everything is not too much
    bits = [c.view(torch.int32) for c in costs]                # ordered as non-negative floats
    thr, below = 0, 0.0                                        # below: gains of bits < thr
    for shift in (24, 16, 8, 0):                               # one byte of thr a pass
        hist = torch.zeros(256, dtype=torch.float64)
        for b, gn, f in zip(bits, gains, forced):
            same = ~f if shift == 24 else ~f & ((b >> (shift + 8)) == thr)
            hist += torch.bincount((b[same] >> shift) & 255, weights=gn[same].double(),
                                   minlength=256).cpu()
        hist = rt.sum(hist)
        byte = int((below + hist.cumsum(0) < need).sum())      # first byte that reaches need
        thr, below = (thr << 8) | byte, below + float(hist[:byte].sum())
    taken = [f | ((b < thr) & ~f) for f, b in zip(forced, bits)]
    short = need - below                                       # ties of earlier processes first
    if rt.size > 1:
        short -= rt.before(sum(int(gn[b == thr].sum()) for b, gn in zip(bits, gains)))
    for chosen, b, gn in zip(taken, bits, gains):              # ties at the threshold, in order
        if short <= 0:
            break
        tie = (b == thr).nonzero()[:, 0]
        take = int((gn[tie].long().cumsum(0) < short).sum()) + 1
        chosen[tie[:take]] = True
        short -= int(gn[tie[:take]].sum())
    return taken


# ----------------------------------------------------------------------------------------------
# 3. The runtimes


class Fast(surgeon.Runtime):
    """One process, with the fast kernels, the memory note and the finite check of the factors."""
    rank, size = 0, 1

    def factors(self, model, layers, batches, device=None):
        device = device or next(model.parameters()).device
        rec = FastRecorder(device)
        with factor_memory_note(rec, layers, device):
            factors = surgeon.kfac_factors(model, layers, batches, device, rec)
        check_finite(factors)
        return factors

    def threshold(self, costs, gains, target, zeros):
        return radix_select(costs, gains, target, zeros, self)

    def remove_elements(self, W, A_inv, G_inv, mask, max_correlate):
        return remove_elements_lazily(W, A_inv, G_inv, mask, max_correlate)

    def keep(self, quad, kept):
        return keeps(quad)

    def sum(self, x: torch.Tensor) -> torch.Tensor:        # over the processes
        return x


def runtime(layers: dict[str, nn.Linear]) -> Fast:
    """Ranks when torch.distributed is initialized with several processes, else Fast."""
    dist = torch.distributed
    several = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    return Ranks(layers) if several else Fast()


class Ranks(Fast):
    """The processes of torch.distributed (e.g. torchrun). Each holds the model and runs its
    share of the calibration windows; each layer is owned by one process, which alone sums its
    factors, inverts, costs and updates it; layers are owned in contiguous shares in model order,
    balanced by the factors' size (n+1)^2 + m^2. The threshold sums counts over the processes
    (exact), the owners send their layers' new weights to all: the single process's result, bit
    for bit."""

    def __init__(self, layers: dict[str, nn.Linear]):
        dist = torch.distributed
        self.rank, self.size = dist.get_rank(), dist.get_world_size()
        self.comm = "cuda" if dist.get_backend() == "nccl" else "cpu"
        self.layers = layers
        self.owner = dict(zip(layers, self.split([(l.out_features, l.in_features)
                                                  for l in layers.values()], self.size)))

    @staticmethod
    def split(shapes: list[tuple[int, int]], ranks: int) -> list[int]:
        """The rank of each (m, n) layer: contiguous shares balanced by (n+1)^2 + m^2."""
        sizes = [(n + 1) ** 2 + m ** 2 for m, n in shapes]
        owner, before, total = [], 0, sum(sizes)
        for size in sizes:
            owner.append(min(ranks - 1, int(ranks * (before + size / 2) / total)))
            before += size
        return owner

    def own(self, layers: dict) -> dict:
        return {n: x for n, x in layers.items() if self.owner[n] == self.rank}

    def factors(self, model, layers, batches, device=None):
        """The owned layers' factors, the windows shared out: in each round of `size` windows,
        rank r runs window r and records every layer's terms (labelled inputs, output gradients,
        float32), then sends each term to the owners of the layers that read it. Where memory
        allows (`overlaps`) the next round runs while they travel; then each owner adds its
        layers' terms to its sums window after window, as the single process adds them: the
        same factors, bit for bit. Memory: a rank's own sums, and besides the activations, one
        window's terms of every layer, and where the rounds overlap about twice as much from
        the round before (kept, sent and received)."""
        device = device or next(model.parameters()).device
        rec, window, batches = FastRecorder(device), Terms(device), iter(batches)
        hooks = {layer: window.forward_hook(name) for name, layer in self.layers.items()}
        with factor_memory_note(rec, layers, device), surgeon.frozen_with_hooks(model, hooks):
            travelling = overlap = None
            while round_ := list(itertools.islice(batches, self.size)):
                if self.rank < len(round_):
                    window.start_batch(round_[self.rank])
                    with torch.enable_grad():
                        surgeon.next_token_loss(model, round_[self.rank]).backward()
                    window.last = (None, None)
                overlap = self.overlaps(window.terms, device) if overlap is None else overlap
                sent = self.send_terms(window, round_, rec)
                if travelling:
                    self.add_terms(*travelling, rec, device)
                travelling = sent
                if not overlap:
                    self.add_terms(*travelling, rec, device)
                    travelling = None
            if travelling:
                self.add_terms(*travelling, rec, device)
        check_finite(factors := surgeon.assemble_factors(rec, layers))
        return factors

    @staticmethod
    def overlaps(terms: dict, device) -> bool:
        """Whether the next round may run while this one's terms travel: the device keeps
        KEEP_FREE of its memory free after twice this window's terms more."""
        need = sum(z.numel() * z.element_size() for z in terms.values())
        free_total = memory(device)
        return free_total is not None and free_total[0] - 2 * need >= KEEP_FREE * free_total[1]

    def send_terms(self, window, round_, rec):
        """Starts the exchange of a round's terms: this rank's sent to the owners of the layers
        that read them, the others' that this rank's layers read posted for receiving."""
        said = [None] * self.size                          # each rank's terms, and sources
        torch.distributed.all_gather_object(said, ([(k, tuple(z.shape)) for k, z in
                                                    window.terms.items()], window.source))
        rec.source.update(said[0][1])
        owners = {k: self.owners_of(k, rec.source) for terms, _ in said for k, _ in terms}
        sending = [(torch.distributed.isend(y, dst=o), y) for o in range(self.size)
                   if o != self.rank for k in window.terms if o in owners[k]
                   for y in [window.terms[k].to(self.comm)]]
        terms = []                                         # each window's: (requests, terms, keys)
        for r in range(len(round_)):
            keys = [(k, shape) for k, shape in said[r][0] if self.rank in owners[k]]
            if r == self.rank:
                terms.append(([], [window.terms[k] for k, _ in keys], keys))
            else:
                ys = [torch.empty(shape, device=self.comm) for _, shape in keys]
                terms.append(([torch.distributed.irecv(y, src=r) for y in ys], ys, keys))
        window.terms = {}
        return round_, terms, sending

    def add_terms(self, round_, terms, sending, rec, device):
        """The sums of a round's terms, window after window."""
        for ids, (requests, y, keys) in zip(round_, terms):
            rec.start_batch(ids)
            for request in requests:
                request.wait()
            for ((kind, name), _), z in zip(keys, y):
                z = z.to(device)
                if kind == "g":
                    rec.add_gram(rec.gg_sum, name, z)
                else:
                    rec.add_input(name, z)
        for request, _ in sending:
            request.wait()

    def owners_of(self, key, source) -> set:
        """The ranks that own a layer reading this term."""
        kind, name = key
        return {self.owner[name]} if kind == "g" else \
            {self.owner[n] for n in self.layers if source.get(n) == name}


    def sum(self, x: torch.Tensor) -> torch.Tensor:
        """x summed over the ranks (a new tensor)."""
        y = x.to(self.comm, copy=True)
        torch.distributed.all_reduce(y)
        return y.to(x.device)

    def before(self, x: float) -> float:
        """The sum of x over the ranks before this one."""
        v = torch.zeros(self.size, dtype=torch.float64)
        v[self.rank] = x
        return float(self.sum(v)[:self.rank].sum())

    def gather(self, vectors: list[torch.Tensor]):
        """Every rank's vectors in rank order, which is model order (each sum adds zeros)."""
        mine = torch.cat(vectors)
        lengths = torch.zeros(self.size, dtype=torch.long)
        lengths[self.rank] = len(mine)
        lengths = self.sum(lengths)
        start = int(lengths[:self.rank].sum())
        full = torch.zeros(int(lengths.sum()), dtype=mine.dtype)
        full[start:start + len(mine)] = mine
        return self.sum(full), start

    def share(self, layers: dict):
        """Every layer's weights from its owner to every rank, bit for bit."""
        for name, layer in layers.items():
            for p in (layer.weight, layer.bias):
                if p is not None:
                    bits = p.data.view(torch.uint8)
                    y = bits.to(self.comm)
                    torch.distributed.broadcast(y, src=self.owner[name])
                    bits.copy_(y)

    @contextmanager
    def stage(self, seconds: dict, name: str):
        with super().stage(seconds, name), self.together():
            yield

    @contextmanager
    def together(self):
        """An error on one rank is raised on every rank, so that none waits in a collective."""
        error, said = None, [None] * self.size
        try:
            yield
        except Exception as err:                                # raised below, on every rank
            error = err
        torch.distributed.all_gather_object(said, error and f"{type(error).__name__}: {error}")
        failed = [(r, text) for r, text in enumerate(said) if text]
        if error is not None:
            raise error
        if failed:
            (r, text), = failed[:1]
            kind, _, text = text.partition(": ")
            raise (ValueError if kind == "ValueError" else RuntimeError)(f"rank {r}: {text}")


# ----------------------------------------------------------------------------------------------
# 4. Layers whose weights accelerate keeps off the device


def offloaded_access(model, folder):
    """Give every layer whose weights accelerate keeps off the device (in host memory or on
    disk, its parameters on 'meta' between calls) the read_weights/write_weights that surgeon.py
    uses. Writes go to host memory in place, or to a new file in `folder` for disk weights (a
    disk weight may be read from the model's own safetensors file, which stays untouched)."""
    from accelerate.utils import offload_weight
    for module in model.modules():
        hook = getattr(module, "_hf_hook", None)
        if not isinstance(module, torch.nn.Linear) or not getattr(hook, "offload", False):
            continue
        store, prefix = hook.weights_map.dataset, hook.weights_map.prefix

        def read(store=store, prefix=prefix, bias=module.bias is not None):
            return store[prefix + "weight"], store[prefix + "bias"] if bias else None

        def write(weight, bias, store=store, prefix=prefix):
            for key, value in ((prefix + "weight", weight), (prefix + "bias", bias)):
                if value is None:
                    continue
                in_memory = getattr(store, "state_dict", store)              # host memory
                if key in in_memory:
                    in_memory[key].copy_(value)
                else:                                                         # disk
                    store.save_folder = store.save_folder or folder
                    offload_weight(value.detach().cpu(), key, store.save_folder, store.index)
        module.read_weights, module.write_weights = read, write


# ----------------------------------------------------------------------------------------------
# prune: surgeon.prune with all of it


def prune(model: nn.Module, batches, settings: Settings, on_shot=None, progress=None,
          first_shot: int = 1, structure=None):
    """surgeon.prune (same arguments), checked before a weight is touched (ValueError), with the
    fast kernels, over the processes when torch.distributed is initialized, float32 products in
    full precision (no TF32), and a note on an error inside a shot."""
    layers, batches = surgeon.prunable_layers(model), list(batches)
    check(settings, layers, batches, structure)
    done = [first_shot - 1]

    def record(shot):
        done.append(shot["shot"])
        if on_shot:
            on_shot(shot)
    with highest_precision(), failure_note(layers, settings.shots, done):
        return surgeon.prune(model, batches, settings, record, progress, first_shot, structure,
                             runtime(layers))

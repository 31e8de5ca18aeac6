"""The LLM Surgeon, in one file.

A reference implementation of van der Ouderaa, Nagel, van Baalen, Asano and Blankevoort,
"The LLM Surgeon", ICLR 2024 (arXiv 2312.17244). Read it top to bottom beside the paper:

  1. settings                          4. Optimal Brain Surgeon costs under F = G (x) A
  2. which layers are pruned           5. OBS updates: rows/columns (exact joint) and elements
  3. KFAC curvature: A and G           6. global threshold across layers, 7. the multi-shot loop

Notation. A linear layer computes y = W x + b with W of shape (m, n). With a bias we work with the
augmented W~ = [W | b] of shape (m, n+1) and input a~ = [x; 1]; theta = vec(W~) row-major, so one
token's gradient is g (x) a~ with g = dloss/dy. The Fisher of a layer is approximated by the
Kronecker product F = G (x) A, A = E[a~ a~^T] (n+1, n+1), G = E[g g^T] (m, m).

Depends on torch only. Works on any module whose prunable layers are nn.Linear (OPT, Llama, ...),
on whatever device the model is on.
"""
import math
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

STRUCTURES = ("unstructured", "2:4", "rowcol")
METHODS = ("surgeon", "kobd", "lobd", "magnitude")


# ----------------------------------------------------------------------------------------------
# 1. Settings


@dataclass
class Settings:
    sparsity: float = 0.5             # fraction of the pruned layers' weights that end at zero
    structure: str = "rowcol"         # "unstructured" | "2:4" | "rowcol" (whole rows and columns)
    method: str = "surgeon"           # "surgeon" | "kobd" | "lobd" | "magnitude" (see curvature())
    shots: int | None = None          # None: 40 for rowcol, 5 for unstructured and 2:4 (paper)
    damp_a: float = 0.01              # lambda_A, relative to mean(diag A)
    damp_g: float | None = None       # lambda_G; None: 0.01 for rowcol, 0.1 otherwise (paper)
    max_correlate: int = 2000         # most removed weights solved together in one element update

    def __post_init__(self):
        if self.shots is None:
            self.shots = 40 if self.structure == "rowcol" else 5
        if self.damp_g is None:
            self.damp_g = 0.01 if self.structure == "rowcol" else 0.1


# ----------------------------------------------------------------------------------------------
# 2. Which layers: every nn.Linear inside the transformer blocks. Embeddings, norms, LM head stay.


def prunable_layers(model: nn.Module) -> dict[str, nn.Linear]:
    """nn.Linear modules inside an nn.ModuleList (the blocks); without blocks, every nn.Linear but
    the output embedding."""
    inside = {name: mod for name, mod in model.named_modules()
              if isinstance(mod, nn.Linear) and any(isinstance(model.get_submodule(p), nn.ModuleList)
                                                    for p in _parents(name))}
    if inside:
        return inside
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {name: mod for name, mod in model.named_modules()
            if isinstance(mod, nn.Linear) and mod is not head}


def _parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def get_matrix(layer: nn.Linear) -> torch.Tensor:
    """W~ = [W | b] in float64, (m, n+1) with a bias, (m, n) without."""
    W = layer.weight.detach().double()
    return W if layer.bias is None else torch.cat([W, layer.bias.detach().double()[:, None]], 1)


@torch.no_grad()
def set_matrix(layer: nn.Linear, W: torch.Tensor):
    n = layer.in_features
    layer.weight.copy_(W[:, :n])
    if layer.bias is not None:
        layer.bias.copy_(W[:, n])


# ----------------------------------------------------------------------------------------------
# 3. KFAC curvature (paper Sec. 3, "Kronecker-factored curvature"): one ordinary backward pass of the
#    true-label mean next-token cross-entropy per sequence (empirical Fisher). Forward hooks read
#    each layer's input x, tensor hooks its output gradient g. No weight gradient is computed.


def next_token_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Sum over sequences of each sequence's mean next-token cross-entropy."""
    out = model(ids)
    logits = out.logits if hasattr(out, "logits") else out                 # (B, L, vocab)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten()) * len(ids)


BLOCKS = 4


def add_gram(sums: dict, name: str, x: torch.Tensor):
    """sums[name] += x^T x, upper block triangle only: a symmetric product needs about one half
    (10 of 16 blocks); `symmetric` mirrors it once at the end."""
    n = x.shape[1]
    S = sums.setdefault(name, x.new_zeros(n, n))
    step = -(-n // BLOCKS)
    for i in range(0, n, step):
        S[i:i + step, i:].addmm_(x[:, i:i + step].T, x[:, i:])


def symmetric(S: torch.Tensor) -> torch.Tensor:
    step = -(-len(S) // BLOCKS)
    for i in range(0, len(S), step):
        S[i + step:, i:i + step] = S[i:i + step, i + step:].T
    return S


def kfac_factors(model: nn.Module, layers: dict[str, nn.Linear], batches, progress=None):
    """A and G of every layer, averaged over the T tokens that have a label (the last position of
    a window predicts nothing and is left out). Returns {name: (A, G)} in float32; A is (n+1, n+1)
    with the bias coordinate where the layer has a bias. Layers that read the same input tensor
    (q, k, v; gate, up) share one A, computed once."""
    XX, Xsum, GG = {}, {}, {}      # running sums: x x^T, x, g g^T
    leader = {}                    # layer -> layer whose A it shares
    last = [None, None]            # the input tensor seen by the previous hook, and whose it was
    B_L = [0, 0]                   # batch size and length of the current batch
    T = 0

    def labelled(z):               # (B, L, d) or (B*L, d) -> (B*(L-1), d): drop last positions
        return z.reshape(*B_L, z.shape[-1])[:, :-1].reshape(-1, z.shape[-1]).float()

    def forward_hook(name):
        def hook(mod, inputs, y):
            x = inputs[0]
            if x is last[0]:                                             # same tensor: share A
                leader[name] = last[1]
            else:
                leader[name], last[:] = name, (x, name)
                x = labelled(x.detach())                                 # (T_batch, n)
                add_gram(XX, name, x)
                Xsum[name] = Xsum.get(name, 0) + x.sum(0)
            if not y.requires_grad:                                      # parameters are frozen:
                y.requires_grad_()                                       # let gradients start here
            y.register_hook(backward_hook(name))
            return y
        return hook

    def backward_hook(name):
        def hook(g):
            add_gram(GG, name, labelled(g))                              # g: (T_batch, m)
        return hook

    params = list(model.parameters())
    needs_grad = [p.requires_grad for p in params]
    was_training = model.training
    handles = [layer.register_forward_hook(forward_hook(name)) for name, layer in layers.items()]
    try:
        model.eval()
        for p in params:
            p.requires_grad_(False)
        for ids in (progress(batches) if progress else batches):
            last[:], B_L[:] = (None, None), ids.shape
            with torch.enable_grad():                                    # also under no_grad
                next_token_loss(model, ids).backward()
            T += ids.shape[0] * (ids.shape[1] - 1)
    finally:
        for h in handles:
            h.remove()
        for p, r in zip(params, needs_grad):
            p.requires_grad_(r)
        model.train(was_training)

    for S in (*XX.values(), *GG.values()):
        symmetric(S).div_(T)
    factors, As = {}, {}
    for name, layer in layers.items():
        src, m = leader[name], layer.out_features
        A = XX[src]
        if layer.bias is not None:                                       # a~ = [x; 1]
            if src not in As:
                s = (Xsum[src] / T)[:, None]
                As[src] = torch.cat([torch.cat([A, s], 1), torch.cat([s.T, s.new_ones(1, 1)], 1)])
            A = As[src]
        factors[name] = (A, GG.get(name, A.new_zeros(m, m)))
    return factors


# ----------------------------------------------------------------------------------------------
# 4. Damping, inverses and OBS costs. Removing an index set Q minimises 1/2 dtheta^T F dtheta
#    subject to (theta + dtheta)_Q = 0; cost 1/2 theta_Q^T [(F^-1)_QQ]^-1 theta_Q (paper Sec. 3).
#    Dead rows (G_ii = 0 or all-zero weights) and dead columns (A_jj = 0 or all-zero weights) are
#    already removed: they are kept out of the inverses, whose rows/columns there are zero.


def damped_inverse(X: torch.Tensor, damp: float, dead: torch.Tensor, name: str = "layer"):
    """X + damp*mean(diag X)*I and its inverse on the live coordinates (float64, Cholesky);
    both zero on the dead ones."""
    X = X.double()
    live = (~dead).nonzero().squeeze(1)
    Xl = X[live][:, live] + damp * X.diagonal().mean() * torch.eye(len(live), dtype=X.dtype,
                                                                   device=X.device)
    L, info = torch.linalg.cholesky_ex(Xl)
    if info != 0 or not torch.isfinite(L).all():
        raise ValueError(f"curvature of {name} is not positive definite; increase the damping "
                         f"(--damp-a / --damp-g)")
    X_hat, X_inv = torch.zeros_like(X), torch.zeros_like(X)
    X_hat[live[:, None], live] = Xl
    X_inv[live[:, None], live] = torch.cholesky_inverse(L)
    return X_hat, X_inv


def curvature(W, n_in, A, G, settings, name="layer"):
    """(A_hat, G_hat, A_inv, G_inv) of one layer under each method (paper's baselines):
    surgeon G (x) A; K-OBD diag(G) (x) diag(A); L-OBD I (x) diag(A); magnitude I (x) I.
    W is W~ (m, k), the first n_in columns being weights and a last one the bias, if any."""
    m, k = W.shape
    damp_a, damp_g = settings.damp_a, settings.damp_g
    eye = lambda d: torch.eye(d, dtype=torch.float64, device=W.device)
    if settings.method == "magnitude":
        A, G, damp_a, damp_g = eye(k), eye(m), 0.0, 0.0
    elif settings.method in ("kobd", "lobd"):
        A = torch.diag(A.diagonal())
        G = torch.diag(G.diagonal()) if settings.method == "kobd" else eye(m)
    dead_rows = (G.diagonal() == 0) | (W == 0).all(1)
    dead_cols = A.diagonal() == 0
    dead_cols[:n_in] |= (W[:, :n_in] == 0).all(0)         # the bias column never dies of zeros
    A_hat, A_inv = damped_inverse(A, damp_a, dead_cols, name)
    G_hat, G_inv = damped_inverse(G, damp_g, dead_rows, name)
    return A_hat, G_hat, A_inv, G_inv


def _safe(d: torch.Tensor) -> torch.Tensor:
    return d.masked_fill(d == 0, math.inf)                 # dead: x / inf = cost 0


def element_costs(W, A_inv, G_inv):
    """(m, n) costs 1/2 W_ij^2 / (G_inv_ii A_inv_jj) of removing one weight each."""
    return 0.5 * W**2 / _safe(G_inv.diagonal()[:, None] * A_inv.diagonal()[None, :])


def row_costs(W, A, G_inv):
    """(m,) costs 1/2 w_r^T A w_r / G_inv_rr of removing one whole row (with its bias)."""
    return 0.5 * ((W @ A) * W).sum(1) / _safe(G_inv.diagonal())


def column_costs(W, G, A_inv):
    """(n,) costs 1/2 w_c^T G w_c / A_inv_cc of removing one whole column."""
    return 0.5 * ((G @ W) * W).sum(0) / _safe(A_inv.diagonal())


def two_four_mask(costs):
    """(m, n) bool: the 2 cheapest of every 4 consecutive inputs of each row."""
    m, n = costs.shape
    cheapest = costs.reshape(m, n // 4, 4).topk(2, dim=-1, largest=False).indices
    mask = torch.zeros(m, n // 4, 4, dtype=torch.bool, device=costs.device)
    return mask.scatter_(-1, cheapest, True).reshape(m, n)


# ----------------------------------------------------------------------------------------------
# 5. OBS updates: dtheta = -F^-1 E_Q [(F^-1)_QQ]^-1 theta_Q with F^-1 = G_inv (x) A_inv.


def remove_rows_columns(W, A_inv, G_inv, rows, cols):
    """Remove rows R and columns C, exact joint OBS. The row step -G_inv[:,R] (G_inv_RR)^-1 W_R
    is a projection on the left, the column step -W[:,C] (A_inv_CC)^-1 A_inv[C,:] one on the
    right; they commute, so one after the other solves the union exactly. (The authors' code adds
    both steps computed from the same W, which drops a cross term.)"""
    W = W.to(G_inv.dtype).clone()
    R = rows[G_inv.diagonal()[rows] > 0]                    # dead rows need no solve, only zeros
    if len(R):
        W -= G_inv[:, R] @ torch.linalg.solve(G_inv[R][:, R], W[R])
    C = cols[A_inv.diagonal()[cols] > 0]
    if len(C):
        W -= torch.linalg.solve(A_inv[C][:, C], W[:, C].T).T @ A_inv[C]
    W[rows] = 0
    W[:, cols] = 0
    return W


def remove_elements(W, A_inv, G_inv, mask, max_correlate):
    """Remove the weights in `mask` (m, n) with correlated OBS updates. The exact system
    C_qq' = G_inv[i_q, i_q'] A_inv[j_q, j_q'] is solved in chunks of whole rows holding at most
    max_correlate removed weights, each chunk on the weights as updated by those before it;
    everything in the mask is zeroed at the end. G = I and one row a chunk is per-row OBS.
    Chunk R's update is dW = -G_inv[:, R] U_R with U_R = M_R A_inv. As in SparseGPT, updates are
    applied lazily: a block of up to LAZY_ROWS rows collects its U's, brings each chunk's rows up
    to date from them, and updates all of W in one product at the end of the block."""
    W = W.to(G_inv.dtype).clone()
    g, a = G_inv.diagonal(), A_inv.diagonal()
    solve = mask & (g[:, None] > 0) & (a[None, :] > 0)      # dead entries: only zeroed
    chunks = list(_row_chunks(solve.sum(1).tolist(), max_correlate))
    while chunks:
        block = [chunks.pop(0)]
        while chunks and sum(map(len, block)) + len(chunks[0]) <= LAZY_ROWS:
            block.append(chunks.pop(0))
        B = torch.tensor([row for R in block for row in R], device=W.device)
        U = torch.zeros(len(B), W.shape[1], dtype=W.dtype, device=W.device)  # (|B|, n)
        start = 0
        for R in block:
            R, here = B[start:start + len(R)], slice(start, start + len(R))
            start += len(R)
            r, j = solve[R].nonzero(as_tuple=True)              # Q as (row in chunk, column)
            A_j, G_R = A_inv[j], G_inv[R]                        # (|Q|, n), (|R|, m)
            C = G_R[:, R][r][:, r] * A_j[:, j]                   # (|Q|, |Q|)
            L, info = torch.linalg.cholesky_ex(C)
            if info != 0:
                raise ValueError("correlated update is not positive definite; increase the damping")
            w = W[R[r], j] - (G_R[:, B] @ U)[r, j]               # W_Q as updated so far
            E = torch.zeros(len(R), len(j), dtype=W.dtype, device=W.device)
            E[r, torch.arange(len(j), device=W.device)] = torch.cholesky_solve(w[:, None], L)[:, 0]
            U[here] = E @ A_j                                    # M_R A_inv
        W -= G_inv[:, B] @ U                                     # dW = -G_inv M A_inv
    W[mask] = 0
    return W


LAZY_ROWS = 128                                             # rows a block updates lazily


def _row_chunks(counts: list[int], max_correlate: int):
    chunk, size = [], 0
    for row, c in enumerate(counts):
        if c == 0:
            continue
        if chunk and size + c > max_correlate:
            yield chunk
            chunk, size = [], 0
        chunk.append(row)
        size += c
    if chunk:
        yield chunk


# ----------------------------------------------------------------------------------------------
# 6. Global threshold (paper Sec. 3, "dynamic allocation"): pool the candidates of all layers,
#    cheapest first, until the shot's number of zero weights is reached. Already-removed
#    candidates are marked with cost -1 and always taken.


def candidates(structure, W, n_in, A_hat, G_hat, A_inv, G_inv):
    """1-D costs of one layer's candidates: rows then columns, weights, or 2:4 groups."""
    g, a = G_inv.diagonal(), A_inv.diagonal()[:n_in]
    if structure == "rowcol":
        rows = row_costs(W, A_hat, G_inv).masked_fill(g == 0, -1)
        cols = column_costs(W, G_hat, A_inv)[:n_in].masked_fill(a == 0, -1)
        return torch.cat([rows, cols])
    e = _element_candidates(W, n_in, A_inv, G_inv)
    if structure == "unstructured":
        return e.flatten()
    two = e.reshape(len(e), -1, 4).topk(2, dim=-1, largest=False).values   # (m, n/4, 2)
    return two.clamp(min=0).sum(-1).masked_fill((two < 0).all(-1), -1).flatten()


def _element_candidates(W, n_in, A_inv, G_inv):
    e = element_costs(W, A_inv, G_inv)[:, :n_in]
    gone = (W[:, :n_in] == 0) | (G_inv.diagonal()[:, None] == 0) | (A_inv.diagonal()[:n_in] == 0)
    return e.masked_fill(gone, -1)


def select(costs, shapes, structure, target):
    """Take the cheapest candidates of all layers until `target` weights are zero. shapes are
    (m, n_in) per layer; counts are exact: 1 per weight, 2 per 2:4 group, and in a layer with
    r rows and c columns removed, r n + c m - r c. Returns one bool tensor per layer."""
    dev = costs[0].device
    flat = torch.cat([c.to(dev, torch.float32) for c in costs])
    forced = int((flat < 0).sum())                           # already removed stay removed
    if structure == "rowcol":                                # few candidates: sort them all
        order = flat.argsort()
        done = _rowcol_gains(order, shapes, dev).cumsum(0)
        k = max(forced, min(len(flat), int((done < target).sum()) + (target > 0)))
        taken = torch.zeros(len(flat), dtype=torch.bool, device=dev)
        taken[order[:k]] = True
    else:                                                    # fixed count: the k smallest
        k = max(forced, min(len(flat), math.ceil(target / (1 if structure == "unstructured" else 2))))
        taken = _k_smallest(flat, k)
    return list(taken.split([len(c) for c in costs]))


def _k_smallest(x, k):
    if k == 0:
        return torch.zeros_like(x, dtype=torch.bool)
    kth = x.kthvalue(k).values
    taken = x < kth
    ties = (x == kth).nonzero()[:k - int(taken.sum()), 0]
    taken[ties] = True
    return taken


def _rowcol_gains(order, shapes, dev):
    """Weights each candidate zeroes when taken in `order`: n - (columns of its layer taken
    before) for a row, m - (rows taken before) for a column."""
    m = torch.tensor([s[0] for s in shapes], device=dev)
    n = torch.tensor([s[1] for s in shapes], device=dev)
    layer = torch.repeat_interleave(torch.arange(len(shapes), device=dev), m + n)
    is_row = torch.cat([torch.arange(a + b, device=dev) < a for a, b in shapes])
    lay, row = layer[order], is_row[order].long()
    by_layer = torch.argsort(lay, stable=True)               # grouped by layer, cost order kept
    lay, row = lay[by_layer], row[by_layer]
    start = torch.cumsum(m + n, 0) - (m + n)                  # first index of each layer's group
    rows_before = row.cumsum(0) - row
    cols_before = (1 - row).cumsum(0) - (1 - row)
    rows_before = rows_before - rows_before[start][lay]
    cols_before = cols_before - cols_before[start][lay]
    g = torch.where(row.bool(), n[lay] - cols_before, m[lay] - rows_before)
    gain = torch.empty_like(g)
    gain[by_layer] = g
    return gain


def apply(structure, method, W, n_in, taken, A_inv, G_inv, max_correlate):
    """The new W~ of one layer once its candidates `taken` are chosen."""
    m = W.shape[0]
    W = W.clone()
    W[G_inv.diagonal() == 0] = 0                              # dead rows and columns
    W[:, A_inv.diagonal() == 0] = 0
    if structure == "rowcol":
        rows, cols = taken[:m].nonzero()[:, 0], taken[m:].nonzero()[:, 0]
        if method == "surgeon":
            return remove_rows_columns(W, A_inv, G_inv, rows, cols)
        W[rows] = 0
        W[:, cols] = 0
        return W
    if structure == "unstructured":
        mask = taken.reshape(m, n_in)
    else:
        e = _element_candidates(W, n_in, A_inv, G_inv)
        mask = two_four_mask(e) & taken.reshape(m, n_in // 4).repeat_interleave(4, 1)
    mask = F.pad(mask, (0, W.shape[1] - n_in))                # the bias is never a candidate
    if method == "surgeon":
        return remove_elements(W, A_inv, G_inv, mask, max_correlate)
    return W.masked_fill(mask, 0)


# ----------------------------------------------------------------------------------------------
# 7. The multi-shot loop (paper Sec. 3, "multi-shot"): shot t of T removes up to s t / T of the
#    weights, with A and G re-estimated on the partly pruned model each time.


def layer_sparsity(layers: dict[str, nn.Linear]) -> dict[str, float]:
    return {name: (layer.weight == 0).float().mean().item() for name, layer in layers.items()}


def overall_sparsity(layers: dict[str, nn.Linear]) -> float:
    zeros = sum(int((layer.weight == 0).sum()) for layer in layers.values())
    return zeros / sum(layer.weight.numel() for layer in layers.values())


def check(settings: Settings, layers=None, batches=None):
    """Raise ValueError for anything that would fail later, before a weight is touched. Without
    layers and batches, checks the settings alone."""
    s = settings
    if s.structure not in STRUCTURES:
        raise ValueError(f"structure must be one of {STRUCTURES}, got {s.structure!r}")
    if s.method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {s.method!r}")
    if not 0 <= s.sparsity < 1:
        raise ValueError(f"sparsity must be in [0, 1), got {s.sparsity}")
    if s.shots < 1 or s.max_correlate < 1 or s.damp_a < 0 or s.damp_g < 0:
        raise ValueError("shots and max_correlate must be >= 1, damping >= 0")
    if s.structure == "2:4" and s.sparsity > 0.5:
        raise ValueError(f"2:4 removes at most half of the weights; sparsity {s.sparsity} "
                         "cannot be met")
    if layers is None:
        return
    if not layers:
        raise ValueError("the model has no prunable nn.Linear layers")
    odd = [name for name, layer in layers.items() if layer.in_features % 4]
    if s.structure == "2:4" and odd:
        raise ValueError(f"2:4 needs input widths divisible by 4; not so for {odd[:3]}")
    if s.method != "magnitude" and s.sparsity > 0 and len(batches) == 0:
        raise ValueError("calibration data is empty")


def check_finite(factors):
    for name, (A, G) in factors.items():
        for X, what in ((A, "A (inputs)"), (G, "G (output gradients)")):
            if not torch.isfinite(X).all():
                raise ValueError(f"non-finite curvature {what} in layer {name}: check the model "
                                 "and data (float32?), or increase the damping")


def prune(model: nn.Module, batches, settings: Settings, on_shot=None, progress=None):
    """Prune `model` in place. batches: a list of (B, L) token id tensors on the model's device.
    on_shot(record) is called after each shot with that shot's record (a dict); progress(iterable,
    description) may wrap the long loops (e.g. tqdm). Returns a report: overall and per-layer
    sparsity and the record of every shot."""
    s = settings
    layers = prunable_layers(model)
    batches = list(batches)
    check(s, layers, batches)
    wrap = progress or (lambda it, desc: it)
    total = sum(layer.weight.numel() for layer in layers.values())
    shapes = [(layer.out_features, layer.in_features) for layer in layers.values()]
    shots, done = [], 0
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")                    # no TF32 on CUDA
    try:
        for t in range(1, s.shots + 1 if s.sparsity > 0 else 1):
            target = round(s.sparsity * total * t / s.shots)        # linear schedule
            seconds = {}
            try:
                tic = time.perf_counter()
                factors = {}
                if s.method != "magnitude":
                    factors = kfac_factors(model, layers, wrap(batches, f"shot {t}/{s.shots} curvature"))
                    check_finite(factors)
                seconds["curvature"] = time.perf_counter() - tic

                tic = time.perf_counter()
                inverses, costs = [], []
                for name, layer in layers.items():
                    W = get_matrix(layer)
                    A, G = factors.get(name, (None, None))
                    A_hat, G_hat, A_inv, G_inv = curvature(W, layer.in_features, A, G, s, name)
                    costs.append(candidates(s.structure, W, layer.in_features,
                                            A_hat, G_hat, A_inv, G_inv))
                    inverses.append((A_inv, G_inv))
                del factors
                taken = select(costs, shapes, s.structure, target)
                seconds["inverses_costs"] = time.perf_counter() - tic

                tic = time.perf_counter()
                for i, (name, layer) in enumerate(wrap(list(layers.items()), f"shot {t}/{s.shots} updates")):
                    W = apply(s.structure, s.method, get_matrix(layer), layer.in_features,
                              taken[i], *inverses[i], s.max_correlate)
                    set_matrix(layer, W)
                    done = t - 1 + (i + 1) / len(layers)
                seconds["updates"] = time.perf_counter() - tic
            except Exception as err:
                if done > 0:
                    err.add_note(f"the model is left pruned: {overall_sparsity(layers):.1%} of the "
                                 f"weights are zero after {done:.2f} of {s.shots} shots")
                raise
            record = {"shot": t, "target": target / total,
                      "sparsity": overall_sparsity(layers), "seconds": seconds}
            shots.append(record)
            if on_shot:
                on_shot(record)
    finally:
        torch.set_float32_matmul_precision(precision)
    return {"sparsity": overall_sparsity(layers), "layers": layer_sparsity(layers), "shots": shots}


# ----------------------------------------------------------------------------------------------
# 8. Compaction: after rows-and-columns pruning, cut what is entirely dead out of the matrices,
#    so that the model really gets smaller. Model-aware only in the names it looks for:
#    an MLP is (fc1, fc2) as in OPT or (gate_proj, up_proj, down_proj) as in Llama; attention is
#    q/k/v_proj with o_proj or out_proj and a head_dim attribute.


def _zero(x: torch.Tensor) -> torch.Tensor:
    """(k, ...) -> (k,): True where the slice x[i] is all zero."""
    return x.reshape(len(x), -1).eq(0).all(1)


@torch.no_grad()
def _keep(layer: nn.Linear, rows=None, cols=None):
    """Shrink a layer in place to the kept output rows / input columns."""
    W = layer.weight
    W = W[rows] if rows is not None else W
    W = W[:, cols] if cols is not None else W
    layer.weight = nn.Parameter(W.clone(), requires_grad=layer.weight.requires_grad)
    if layer.bias is not None and rows is not None:
        layer.bias = nn.Parameter(layer.bias[rows].clone(), requires_grad=layer.bias.requires_grad)
    layer.out_features, layer.in_features = W.shape


@torch.no_grad()
def _compact_mlp(up: list[nn.Linear], down: nn.Linear, act, gated: bool) -> int:
    """Remove hidden units that cannot change the output. Ungated (OPT): unit i is dead when
    down's column i is zero, or when up's row i is zero in its weights, so that it outputs the
    constant act(b_i), which is folded into down's bias. Gated (Llama): act(gate x) * (up x) is
    zero when either row is zero with zero bias (act(0) = 0 for SiLU) or down's column is."""
    dead = _zero(down.weight.T)
    if gated:
        gate, lin = up
        dead |= _zero(get_matrix(lin)) | (_zero(get_matrix(gate)) & bool(act(torch.zeros(1)) == 0))
    else:
        (fc1,) = up
        const = act(fc1.bias) if fc1.bias is not None else fc1.weight.new_zeros(len(fc1.weight))
        quiet = _zero(fc1.weight) & ((const == 0) | (down.bias is not None))
        if down.bias is not None:
            down.bias += down.weight[:, quiet] @ const[quiet]
        dead |= quiet
    keep = (~dead).nonzero()[:, 0]
    for layer in up:
        _keep(layer, rows=keep)
    _keep(down, cols=keep)
    return int(dead.sum())


@torch.no_grad()
def _compact_attention(attn: nn.Module) -> int:
    """Remove heads whose output is exactly zero: their o/out_proj columns are zero, or their
    v rows (with bias) are. With grouped k/v heads, only whole groups go. Returns heads removed."""
    q, k, v = attn.q_proj, attn.k_proj, attn.v_proj
    o = attn.o_proj if hasattr(attn, "o_proj") else attn.out_proj
    d, dev = attn.head_dim, q.weight.device
    heads, kv = q.out_features // d, k.out_features // d
    group = heads // kv
    silent = _zero(o.weight.T.reshape(heads, d, -1)) | \
        _zero(get_matrix(v).reshape(kv, d, -1)).repeat_interleave(group)
    gone = silent.reshape(kv, group).all(1)                  # whole groups only
    gone[0] &= not gone.all()                                # attention needs a head
    keep_kv = (~gone).nonzero()[:, 0]
    keep_q = (keep_kv[:, None] * group + torch.arange(group, device=dev)).flatten()
    rows_q = (keep_q[:, None] * d + torch.arange(d, device=dev)).flatten()
    rows_kv = (keep_kv[:, None] * d + torch.arange(d, device=dev)).flatten()
    _keep(q, rows=rows_q)
    _keep(k, rows=rows_kv)
    _keep(v, rows=rows_kv)
    _keep(o, cols=rows_q)
    for name, value in (("num_heads", len(keep_q)), ("num_key_value_heads", len(keep_kv))):
        if hasattr(attn, name):
            setattr(attn, name, value)
    return int(gone.sum()) * group


def compact(model: nn.Module) -> dict:
    """Cut dead MLP units and attention heads out of the weight matrices; the function computed
    stays the same. Zeros elsewhere stay: in heads and units that still work, and in input
    columns that read the residual stream, whose width every block shares. Returns counts and
    the new shapes (for `resize`)."""
    report = {"params_before": sum(p.numel() for p in model.parameters()),
              "mlp_units_removed": 0, "heads_removed": 0}
    for module in list(model.modules()):
        if all(hasattr(module, n) for n in ("fc1", "fc2", "activation_fn")):
            report["mlp_units_removed"] += _compact_mlp([module.fc1], module.fc2,
                                                        module.activation_fn, gated=False)
        elif all(hasattr(module, n) for n in ("gate_proj", "up_proj", "down_proj", "act_fn")):
            report["mlp_units_removed"] += _compact_mlp([module.gate_proj, module.up_proj],
                                                        module.down_proj, module.act_fn, gated=True)
        elif all(hasattr(module, n) for n in ("q_proj", "k_proj", "v_proj", "head_dim")):
            report["heads_removed"] += _compact_attention(module)
    layers = prunable_layers(model)
    report["params_after"] = sum(p.numel() for p in model.parameters())
    report["zeros_kept"] = sum(int((l.weight == 0).sum()) for l in layers.values())
    report["zero_columns_kept"] = sum(int(_zero(l.weight.T).sum()) for l in layers.values())
    report["shapes"] = shapes(model)
    return report


def shapes(model: nn.Module) -> dict:
    """What `resize` needs to rebuild a compacted model from its original config."""
    return {"linear": {name: list(m.weight.shape) for name, m in model.named_modules()
                       if isinstance(m, nn.Linear)},
            "heads": {name: {k: getattr(m, k) for k in ("num_heads", "num_key_value_heads")
                             if hasattr(m, k)}
                      for name, m in model.named_modules() if hasattr(m, "head_dim")}}


@torch.no_grad()
def resize(model: nn.Module, spec: dict):
    """Give a freshly built model the shapes of a compacted one (weights still to be loaded)."""
    for name, (out_f, in_f) in spec["linear"].items():
        layer = model.get_submodule(name)
        if tuple(layer.weight.shape) != (out_f, in_f):
            _keep(layer, rows=torch.arange(out_f), cols=torch.arange(in_f))
    for name, attrs in spec["heads"].items():
        for k, value in attrs.items():
            setattr(model.get_submodule(name), k, value)

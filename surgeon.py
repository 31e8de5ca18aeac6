"""The LLM Surgeon, in one file.

A reference implementation of van der Ouderaa, Nagel, van Baalen, Asano and Blankevoort,
"The LLM Surgeon", ICLR 2024 (arXiv 2312.17244). Read it top to bottom beside the paper; it
depends on torch only and runs on its own. "Sec." is the paper's, "section" this file's:

  1. settings                          5. OBS updates (Sec. 3.3, Eq. 6-8)
  2. the layers that are pruned        6. structures (weights, N:M groups, rows and columns):
  3. KFAC curvature (Sec. 3.1, Eq. 3)     candidates, the global threshold (Sec. 3.4), updates
  4. damping, the quadratic model      7. interleaved low-rank updates (Sec. 3.5)
     and its costs (Sec. 3.2-3.3)      8. the runtime, and the multi-shot loop (Sec. 3.6)

One shot t of `shots` (`shot`, called by `prune` for t = 1 .. shots):
    target = sparsity * t / shots * weights                  # linear schedule (Sec. 3.6)
    A, G = kfac_factors(model, layers, batches)              # Sec. 3.1: a backward pass a window
    for each layer:
        quad = quadratic(layer, A, G)                        # Sec. 3.2: A_hat, G_hat, inverses
        candidates += structure.candidates(quad)             # Sec. 3.3: OBS cost of every candidate
    taken = structure.select(candidates, target)             # Sec. 3.4: one threshold, all layers
    for each layer:
        quad = quadratic(layer, A, G)                        # again, unless the runtime kept it
        W~ = structure.update(quad, taken, candidates)       # Sec. 3.3: OBS update, Eq. 6-8
    low_rank_phase(model, layers, batches)                   # Sec. 3.5, if lora_steps > 0

Notation, one meaning per symbol. A linear layer computes y = W x + b with W of shape (m, n);
with a bias we work with the augmented W~ = [W | b] of shape (m, k = n+1) and input a~ = [x; 1],
without one W~ = W, k = n. theta = vec(W~) row-major, so one token's gradient is g (x) a~ with
g = dloss/dy. The Fisher of a layer is approximated by F = G (x) A, A = E[a~ a~^T] (k, k),
G = E[g g^T] (m, m), both undamped; A_hat, G_hat are damped, A_inv, G_inv the inverses of
A_hat, G_hat; alpha (k,), gamma (m,) the precisions of single coordinates; dW an update; cost a
candidate's loss increase; quad one layer's quadratic model (the paper's q is an index).

Precision. The model keeps its dtype: x and g are cast to float32 before the outer products,
costs and updates are float64, W~ is written back in the model's dtype (removed: an exact 0),
the low-rank adapters train in float32. Beside this file, plugged in where it says so: units.py,
heads and MLP units (a structure, section 6); scale.py, a runtime (section 8: fast kernels,
several processes, checks and memory notes, weights that accelerate keeps off the device).
"""
import itertools
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

METHODS = ("surgeon", "kobd", "lobd", "magnitude")
REMOVED = -1.0              # cost of a candidate that is already removed: always taken, gains 0
LINES = ("rowcol", "units")  # the structures that remove whole rows and columns (units: units.py)


# ----------------------------------------------------------------------------------------------
# 1. Settings


@dataclass
class Settings:
    sparsity: float = 0.5             # fraction of the pruned layers' weights that end at zero
    structure: str = "rowcol"         # "unstructured" | "N:M" (2:4, 4:8, ...) | "rowcol" | "units"
    method: str = "surgeon"           # "surgeon" | "kobd" | "lobd" | "magnitude" (Sec. 4 baselines)
    shots: int | None = None          # None: rowcol, units 1.25% a shot (paper), else 5 (paper)
    damp_a: float = 0.01              # lambda_A, relative to the mean live diagonal of A
    damp_g: float = 0.1               # lambda_G, likewise (the paper: 0.01 for rowcol)
    damp_costs: bool = False          # rowcol, units: forms with A_hat, G_hat (the authors': A, G)
    max_correlate: int = 1            # removed weights solved together (a row; the authors: 2000)
    curvature_device: str | None = None   # where A and G live; None: the model's device
    lora_steps: int | None = None     # low-rank steps a shot (None: 3 for surgeon on LINES, else 0)
    lora_rank: int = 8
    lora_lr: float = 1e-4

    def __post_init__(self):
        if self.shots is None:                              # 1e-9: 0.1 / 0.0125 is 8.000...02
            self.shots = max(1, math.ceil(self.sparsity / 0.0125 - 1e-9)) \
                if self.structure in LINES else 5
        if self.lora_steps is None:
            self.lora_steps = 3 if self.structure in LINES and self.method == "surgeon" else 0


# ----------------------------------------------------------------------------------------------
# 2. Which layers: every nn.Linear inside the transformer blocks. Embeddings, norms, LM head stay.


def prunable_layers(model: nn.Module) -> dict[str, nn.Linear]:
    """nn.Linear modules inside an nn.ModuleList (the blocks); without blocks, every nn.Linear but
    the output embedding."""
    def in_blocks(name):
        parts = name.split(".")
        return any(isinstance(model.get_submodule(".".join(parts[:i])), nn.ModuleList)
                   for i in range(1, len(parts)))
    linear = {name: mod for name, mod in model.named_modules() if isinstance(mod, nn.Linear)}
    inside = {name: mod for name, mod in linear.items() if in_blocks(name)}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return inside or {name: mod for name, mod in linear.items() if mod is not head}


def weights_of(layer: nn.Linear):
    """(weight, bias), or what layer.read_weights() returns where they live elsewhere."""
    read = getattr(layer, "read_weights", None)
    return read() if read else (layer.weight.detach(), layer.bias)


def get_matrix(layer: nn.Linear) -> torch.Tensor:
    """W~ = [W | b] in float64, (m, n+1) with a bias, (m, n) without."""
    W, b = (x.detach().double() if x is not None else None for x in weights_of(layer))
    return W if b is None else torch.cat([W, b[:, None]], 1)


@torch.no_grad()
def set_matrix(layer: nn.Linear, W: torch.Tensor):
    """Write W~ back: into the parameters, or through layer.write_weights(weight, bias)."""
    n, dtype = layer.in_features, layer.weight.dtype
    weight, bias = W[:, :n].to(dtype), W[:, n].to(dtype) if layer.bias is not None else None
    if hasattr(layer, "write_weights"):
        return layer.write_weights(weight, bias)
    layer.weight.copy_(weight)
    if bias is not None:
        layer.bias.copy_(bias)


# ----------------------------------------------------------------------------------------------
# 3. KFAC curvature (Sec. 3.1, Eq. 3): one ordinary backward pass of the true-label mean
#    next-token cross-entropy per sequence (empirical Fisher). Forward hooks read each layer's
#    input x, tensor hooks its output gradient g. No weight gradient is computed.


def next_token_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Sum over sequences of each sequence's mean next-token cross-entropy. The last position has
    no label and is ignored, not sliced off: no copy of the (B, L, vocab) logits."""
    out = model(ids)
    logits = out.logits if hasattr(out, "logits") else out                 # (B, L, vocab)
    labels = F.pad(ids[:, 1:], (0, 1), value=-100)                         # (B, L)
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100) \
        * len(ids)


class Recorder:
    """Running sums over labelled tokens, filled by hooks: xx_sum[s] = sum x x^T and x_sum[s] =
    sum x of every distinct input tensor (named after the first layer s that reads it), and
    gg_sum[name] = sum g g^T of every layer. The last position of a window has no label."""

    def __init__(self, device):
        self.device, self.tokens, self.batch_shape = device, 0, None
        self.xx_sum, self.x_sum, self.gg_sum = {}, {}, {}
        self.source = {}                   # layer -> the layer whose input sums it shares
        self.last = (None, None)           # the input tensor read last, and its first reader

    def add_gram(self, sums, key, z):      # sums[key] += z^T z
        sums.setdefault(key, z.new_zeros(z.shape[1], z.shape[1])).addmm_(z.T, z)

    def add_input(self, name, x):          # the sums of one input tensor
        self.add_gram(self.xx_sum, name, x)
        self.x_sum[name] = self.x_sum.get(name, 0) + x.sum(0)

    def gram(self, S):                     # the sum, complete
        return S

    def labelled(self, z):                 # (B, L, d) or (B*L, d) -> (B*(L-1), d) on device
        (B, L), d = self.batch_shape, z.shape[-1]
        return z.reshape(B, L, d)[:, :-1].reshape(-1, d).to(self.device, torch.float32)

    def start_batch(self, ids):
        self.batch_shape, self.last = ids.shape, (None, None)
        self.tokens += ids.shape[0] * (ids.shape[1] - 1)

    def forward_hook(self, name):
        def hook(layer, inputs, y):
            x = inputs[0]
            if x is self.last[0]:                             # q, k, v (gate, up) read one tensor
                self.source[name] = self.last[1]
            else:
                self.source[name], self.last = name, (x, name)
                self.add_input(name, self.labelled(x.detach()))                 # (tokens, n)
            if not y.requires_grad:                        # parameters are frozen: let the
                y.requires_grad_()                         # gradient start here
            y.register_hook(self.backward_hook(name))
            return y
        return hook

    def backward_hook(self, name):
        def hook(g):
            g = self.labelled(g)                                                # (tokens, m)
            self.add_gram(self.gg_sum, name, g)
        return hook


@contextmanager
def frozen_with_hooks(model, hooks: dict):
    """Parameters frozen (no weight gradients), eval mode, forward hooks {module: hook} on; all
    restored afterwards."""
    trainable, was_training = [p for p in model.parameters() if p.requires_grad], model.training
    handles = [module.register_forward_hook(hook) for module, hook in hooks.items()]
    try:
        model.eval().requires_grad_(False)
        yield
    finally:
        for h in handles:
            h.remove()
        for p in trainable:
            p.requires_grad_(True)
        model.train(was_training)


def kfac_factors(model: nn.Module, layers: dict[str, nn.Linear], batches, device=None,
                 rec: Recorder | None = None):
    """{name: (A, G)} of every layer, averaged over the labelled tokens, float32 on `device`
    (default: the model's); A (k, k) with the bias coordinate, one object per input tensor."""
    rec = rec or Recorder(device or next(model.parameters()).device)
    hooks = {layer: rec.forward_hook(name) for name, layer in layers.items()}
    with frozen_with_hooks(model, hooks):
        for ids in batches:
            rec.start_batch(ids)
            with torch.enable_grad():                                # also under no_grad
                next_token_loss(model, ids).backward()
    rec.last = (None, None)           # it holds the autograd graph, whose hooks hold rec: a cycle
    return assemble_factors(rec, layers)


def assemble_factors(rec: Recorder, layers):
    """Averages, the bias coordinate a~ = [x; 1] of A, and one A object per shared input."""
    n_tokens, A_of, factors = rec.tokens, {}, {}
    for name, layer in layers.items():
        src = rec.source[name]
        if src not in A_of:
            A = rec.gram(rec.xx_sum[src]).div_(n_tokens)                        # E[x x^T]
            if layer.bias is not None:
                mean = (rec.x_sum[src] / n_tokens)[:, None]                     # E[x]
                A = torch.cat([torch.cat([A, mean], 1),
                               torch.cat([mean.T, mean.new_ones(1, 1)], 1)])
            A_of[src] = A
        m = layer.out_features
        G = rec.gram(rec.gg_sum[name]).div_(n_tokens) if name in rec.gg_sum \
            else A_of[src].new_zeros(m, m)
        factors[name] = (A_of[src], G)
    return factors


# ----------------------------------------------------------------------------------------------
# 4. The quadratic model of one layer and the costs of its candidates.
#    OBS (Sec. 3.3, Eq. 5): removing an index set Q costs 1/2 theta_Q^T [(F^-1)_QQ]^-1 theta_Q with
#    F^-1 = G_inv (x) A_inv, the damped inverses. OBD baselines (Sec. 4, "K-OBD", "L-OBD"): no
#    update follows, so the cost is the quadratic form 1/2 theta_Q^T F_QQ theta_Q of the undamped
#    F. With alpha (k,) and gamma (m,) the precisions of single coordinates, a weight, a row and a
#    column cost
#      element (i, j): 1/2 gamma_i alpha_j W_ij^2      row r: 1/2 gamma_r w_r^T A w_r
#      column c: 1/2 alpha_c w_c^T G w_c
#    surgeon:   alpha = 1 / diag(A_inv), gamma = 1 / diag(G_inv); the row and column forms with
#               the undamped A, G as the authors' code (damp_costs: with A_hat, G_hat, exact OBS)
#    K-OBD:     alpha = diag(A),       gamma = diag(G)
#    L-OBD:     alpha = diag(A),       gamma = 1,      G = I
#    magnitude: alpha = 1,             gamma = 1,      A = I, G = I        (None means I).
#    Dead rows (G_ii = 0, or all-zero weights) and columns (A_jj = 0, or all-zero weights) are
#    kept out of the inverses; alpha, gamma are 0 there, so their weights cost 0. They count as
#    removed only once zero: a row that died in the last shot (its outputs feed a removed column)
#    is a free candidate, not a forced one, so the threshold still stops at its target.


def damped_inverse(X: torch.Tensor, damp: float, dead: torch.Tensor, name: str = "layer"):
    """X_hat = X + damp * mean(diag X_live) * I on the live coordinates, and its inverse (float64,
    Cholesky); both zero on the dead coordinates (Sec. 3.2, damping). X itself is not changed."""
    live = (~dead).nonzero()[:, 0]
    everything = len(live) == len(X)
    X_live = X.to(torch.float64, copy=True) if everything else X[live][:, live].double()
    X_live.diagonal().add_(damp * X_live.diagonal().mean() if len(live) else 0.0)
    L, info = torch.linalg.cholesky_ex(X_live)
    if info != 0 or not torch.isfinite(L).all():
        raise ValueError(f"curvature of {name} is not positive definite; increase the damping "
                         f"(--damp-a / --damp-g)")
    X_inv_live = torch.cholesky_inverse(L)     # symmetric, so read row by row (as the updates
    del L                                      # gather it) where LAPACK wrote it column-major
    X_inv_live = X_inv_live if X_inv_live.is_contiguous() else X_inv_live.mT
    if everything:
        return X_live, X_inv_live
    X_hat = X_live.new_zeros(X.shape)
    X_inv = torch.zeros_like(X_hat)
    X_hat[live[:, None], live] = X_live
    X_inv[live[:, None], live] = X_inv_live
    return X_hat, X_inv


@dataclass
class Quadratic:
    """One layer's quadratic model (above), float64 on the layer's device. W~ (m, k) has n_in
    weight columns, then the bias if any; removed (m, n_in): weights that are zero already.
    A, G undamped and A_hat, G_hat damped are kept only where a cost's quadratic form reads them
    (None otherwise, or for an identity factor); A_inv, G_inv only for surgeon."""
    W: torch.Tensor
    n_in: int
    alpha: torch.Tensor
    gamma: torch.Tensor
    removed: torch.Tensor
    A: torch.Tensor | None = None
    G: torch.Tensor | None = None
    A_hat: torch.Tensor | None = None
    G_hat: torch.Tensor | None = None
    A_inv: torch.Tensor | None = None
    G_inv: torch.Tensor | None = None
    name: str = "layer"

    def forms(self):                  # (A, G) of the rows' and columns' quadratic forms
        return (self.A_hat, self.G_hat) if self.A_hat is not None else (self.A, self.G)


def quadratic(layer: nn.Linear, A, G, cfg: Settings, name="layer") -> Quadratic:
    """The quadratic model of one layer under cfg.method, from its float32 factors (see above)."""
    W = get_matrix(layer)
    m, k = W.shape
    n_in, dev = layer.in_features, W.device
    A = None if cfg.method == "magnitude" else A.to(dev)
    G = G.to(dev) if cfg.method in ("surgeon", "kobd") else None
    dead_rows = (W == 0).all(1) | (G.diagonal() == 0 if G is not None else False)
    dead_cols = A.diagonal() == 0 if A is not None else torch.zeros(k, dtype=torch.bool, device=dev)
    dead_cols[:n_in] |= (W[:, :n_in] == 0).all(0)          # the bias column never dies of zeros
    removed = W[:, :n_in] == 0
    if cfg.method == "surgeon":
        A_hat, A_inv = damped_inverse(A, cfg.damp_a, dead_cols, name)
        G_hat, G_inv = damped_inverse(G, cfg.damp_g, dead_rows, name)
        alpha, gamma = 1 / A_inv.diagonal(), 1 / G_inv.diagonal()  # 1 / (F^-1)_qq per factor
        alpha[dead_cols], gamma[dead_rows] = 0, 0
        quad = Quadratic(W, n_in, alpha, gamma, removed, A_inv=A_inv, G_inv=G_inv, name=name)
        if cfg.structure in LINES and cfg.damp_costs:       # only rows and columns have forms
            quad.A_hat, quad.G_hat = A_hat, G_hat
        elif cfg.structure in LINES:
            quad.A, quad.G = A.double(), G.double()
        return quad
    A, G = (X.double() if X is not None else None for X in (A, G))      # OBD: undamped
    alpha = A.diagonal().clone() if A is not None else W.new_ones(k)
    gamma = G.diagonal().clone() if G is not None else W.new_ones(m)
    alpha[dead_cols], gamma[dead_rows] = 0, 0
    return Quadratic(W, n_in, alpha, gamma, removed, A=A, G=G, name=name)


def element_costs(W, alpha, gamma):
    """(m, k) costs 1/2 gamma_i alpha_j W_ij^2 of removing one weight each."""
    return W.square().mul_(alpha).mul_(gamma[:, None]).mul_(0.5)


def row_costs(W, A, gamma):
    """(m,) costs 1/2 gamma_r w_r^T A w_r of removing one whole row (with its bias)."""
    return 0.5 * gamma * (((W @ A) * W).sum(1) if A is not None else (W * W).sum(1))


def column_costs(W, G, alpha):
    """(k,) costs 1/2 alpha_c w_c^T G w_c of removing one whole column."""
    return 0.5 * alpha * (((G @ W) * W).sum(0) if G is not None else (W * W).sum(0))


# ----------------------------------------------------------------------------------------------
# 5. OBS updates (Sec. 3.3, Eq. 6): dtheta = -F^-1 E_Q [(F^-1)_QQ]^-1 theta_Q with
#    F^-1 = G_inv (x) A_inv. The OBD baselines make no update: they only zero what they remove.


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
    """Remove the weights in `mask` (m, k) with correlated OBS updates (Eq. 7-8). The exact
    system C_qq' = G_inv[i_q, i_q'] A_inv[j_q, j_q'] is solved in chunks of whole rows holding at
    most max_correlate removed weights, each chunk on the weights as updated by those before it;
    everything in the mask is zeroed at the end. G = I and one row a chunk is per-row OBS.
    Chunk R's update is dW = -G_inv[:, R] E_R A_inv with E_R = C^-1 w_Q on Q (zero elsewhere)."""
    W = W.to(G_inv.dtype).clone()
    solve = mask & (G_inv.diagonal()[:, None] > 0) & (A_inv.diagonal()[None, :] > 0)
    for R in row_chunks(solve.sum(1).tolist(), max_correlate):
        R = torch.tensor(R, device=W.device)
        r, j = solve[R].nonzero(as_tuple=True)                              # Q in chunk R
        i = R[r]
        C = G_inv[i][:, i] * A_inv[j][:, j]                                 # Eq. 7
        E = W.new_zeros(len(R), W.shape[1])                                 # E_R (|R|, k)
        E[r, j] = torch.linalg.solve(C, W[i, j])
        W -= G_inv[:, R] @ E @ A_inv                                        # Eq. 8
    W[mask] = 0
    return W


def row_chunks(counts: list[int], max_correlate: int):
    """Consecutive rows that remove something, in chunks holding at most max_correlate removed
    weights (a row that removes more is a chunk of its own)."""
    chunks, rows, size = [], [], 0
    for row, c in enumerate(counts):
        if c == 0:
            continue
        if rows and size + c > max_correlate:
            chunks.append(rows)
            rows, size = [], 0
        rows.append(row)
        size += c
    return chunks + ([rows] if rows else [])


# ----------------------------------------------------------------------------------------------
# 6. Structures: what a candidate is, what it costs, how the global threshold (Sec. 3.4, "dynamic
#    allocation") picks among the candidates of all layers, and what the update then removes.
#    Each gives candidates(quad, cfg) -> its candidates, select(candidates of every layer,
#    target, zeros, rt) -> the taken ones per layer, and update(quad, taken, candidates, cfg, rt)
#    -> the new W~. Zeros count whatever made them: a candidate adds only the nonzero weights it
#    zeroes, and candidates already removed cost REMOVED (always taken).


@dataclass
class Candidates:
    """One layer's candidates: cost (c,) float32, and gain (c,), the nonzero weights each zeroes."""
    cost: torch.Tensor
    gain: torch.Tensor


@dataclass
class GroupCandidates(Candidates):
    """N:M groups, with the cheapest N of every group (rows, n/M, M), chosen once for the update."""
    choice: torch.Tensor


@dataclass
class LineCandidates:
    """Rows then columns of one layer: cost (m + n,) float32; their gains overlap, so the (m, n)
    nonzero pattern stands for them."""
    cost: torch.Tensor
    nonzero: torch.Tensor


def positions(order):                               # each candidate's position in order
    position = torch.empty_like(order)
    position[order] = torch.arange(len(order), device=order.device)
    return position


def shortest_prefix(cost, order, added, target, zeros):
    """(c,) bool: the candidates in the shortest prefix of `order` (cost order, already removed
    ones first and always taken) whose added zeros (cumulative, in that order) reach target."""
    take = max(int((cost == REMOVED).sum()),
               min(len(cost), int((zeros + added < target).sum()) + (target > zeros)))
    taken = torch.zeros(len(cost), dtype=torch.bool, device=cost.device)
    taken[order[:take]] = True
    return taken


def threshold_select(costs, gains, target, zeros):
    """Fixed gains per candidate: the shortest prefix of all candidates in cost order (a stable
    sort over the layers in turn; already removed ones first) whose gains reach `target` zeros."""
    cost, gain = torch.cat(costs), torch.cat(gains).long()
    order = cost.argsort(stable=True)                                      # REMOVED < 0: first
    taken = shortest_prefix(cost, order, gain[order].cumsum(0), target, zeros)
    return list(taken.split([len(c) for c in costs]))


class Elements:
    """Structures of single weights: the update removes a mask of them (Sec. 3.3, Eq. 7-8)."""

    def select(self, cands: list[Candidates], target: int, zeros: int, rt):
        return rt.threshold([c.cost for c in cands], [c.gain for c in cands], target, zeros)

    def update(self, quad: Quadratic, taken, cand: Candidates, cfg: Settings, rt):
        """Weights already zero stay zero: they are constraints of the update."""
        W = quad.W.clone()
        mask = F.pad(self.mask(quad, taken, cand) | quad.removed,
                     (0, W.shape[1] - quad.n_in))                                   # no bias
        if cfg.method == "surgeon":                            # OBD makes no update (Sec. 4)
            return rt.remove_elements(W, quad.A_inv, quad.G_inv, mask, cfg.max_correlate)
        return W.masked_fill(mask, 0)


class Unstructured(Elements):
    """A candidate is one weight."""
    name = "unstructured"

    def candidates(self, quad: Quadratic, cfg: Settings) -> Candidates:
        n = quad.n_in
        cost = element_costs(quad.W[:, :n].masked_fill(quad.removed, 0), quad.alpha[:n], quad.gamma)
        nonzero = quad.W[:, :n] != 0
        return Candidates(cost.masked_fill(quad.removed, REMOVED).flatten().float(),
                          nonzero.flatten().to(torch.uint8))

    def mask(self, quad: Quadratic, taken, cand: Candidates):
        return taken.reshape(quad.removed.shape)


class NM(Elements):
    """A candidate is a group of M consecutive inputs of a row, of which N go (Sec. 3.3; 2:4 is
    the paper's case). Its cost is the cheapest N-subset's: for LLM Surgeon and magnitude the
    sum of its N smallest element costs, for the OBD baselines the subset's quadratic form
    1/2 gamma_i w_S^T A_SS w_S (cross terms included) over all C(M, N) subsets. At N/M every group
    is taken (the most N:M allows)."""

    def __init__(self, N: int, M: int):
        self.N, self.M, self.name = N, M, f"{N}:{M}"
        self.subsets = torch.tensor(list(itertools.combinations(range(M), N)))  # (C(M, N), N)

    def cheapest(self, quad: Quadratic, method: str):
        """(rows, n/M, M) bool: the cheapest N of every group, and (rows, n/M) their cost."""
        rows, n = len(quad.W), quad.n_in
        W = quad.W[:, :n].masked_fill(quad.removed, 0).reshape(rows, n // self.M, self.M)
        if method in ("kobd", "lobd"):
            S = self.subsets.to(W.device)
            idx = torch.arange(n, device=W.device).reshape(n // self.M, self.M)[:, S]
            P = quad.A[idx[..., :, None], idx[..., None, :]]               # (n/M, C, N, N)
            w = W[..., S]                                                   # (rows, n/M, C, N)
            cost, best = (0.5 * quad.gamma[:, None, None] *
                          torch.einsum("rgci,gcij,rgcj->rgc", w, P, w)).min(-1)
            pick = S[best]                                                  # (rows, n/M, N)
        else:
            e = element_costs(W.reshape(rows, n), quad.alpha[:n], quad.gamma).reshape(W.shape)
            e, order = e.sort(dim=-1, stable=True)                            # ties: first index
            cost, pick = e[..., :self.N].sum(-1), order[..., :self.N]
        choice = torch.zeros_like(W, dtype=torch.bool).scatter_(-1, pick, True)
        return choice, cost

    def candidates(self, quad: Quadratic, cfg: Settings) -> GroupCandidates:
        choice, cost = self.cheapest(quad, cfg.method)
        removed, nonzero = (x.reshape(choice.shape) for x in (quad.removed,
                                                               quad.W[:, :quad.n_in] != 0))
        gone = (choice & ~removed).sum(-1) == 0                             # nothing left to cut
        gain = (choice & nonzero).sum(-1)
        return GroupCandidates(cost.masked_fill(gone, REMOVED).flatten().float(),
                               gain.flatten().to(torch.uint8), choice)

    def select(self, cands: list[GroupCandidates], target: int, zeros: int, rt):
        groups, _ = rt.gather([torch.tensor([len(c.cost)]) for c in cands])     # every layer's
        if target >= self.N * int(groups.sum()):
            return [torch.ones_like(c.cost, dtype=torch.bool) for c in cands]
        return super().select(cands, target, zeros, rt)

    def mask(self, quad: Quadratic, taken, cand: GroupCandidates):
        return (cand.choice & taken.reshape(*cand.choice.shape[:2], 1)).reshape(quad.removed.shape)


def remove_lines(quad: Quadratic, rows, cols, cfg: Settings):
    """W~ without rows and columns: exact joint OBS for surgeon (Eq. 6), zeros for the baselines;
    weights that were zero are zeroed again after it."""
    W = quad.W.clone()
    if cfg.method == "surgeon":
        W = remove_rows_columns(W, quad.A_inv, quad.G_inv, rows, cols)
    W[rows], W[:, cols] = 0, 0
    W[:, :quad.n_in][quad.removed] = 0
    return W


class RowCol:
    """A candidate is a whole row (an output, with its bias) or column (an input) of a layer;
    the bias column is never one."""
    name = "rowcol"

    def candidates(self, quad: Quadratic, cfg: Settings) -> LineCandidates:
        A, G = quad.forms()
        nonzero = ~quad.removed
        rows = row_costs(quad.W, A, quad.gamma).masked_fill(~nonzero.any(1), REMOVED)
        cols = column_costs(quad.W, G, quad.alpha)[:quad.n_in].masked_fill(~nonzero.any(0), REMOVED)
        return LineCandidates(torch.cat([rows, cols]).float(), nonzero)

    def select(self, cands: list[LineCandidates], target: int, zeros: int, rt):
        """Sort all rows and columns (few); each one's gain follows from the global order: a
        row r adds the nonzeros of its columns taken after it, sum_c nz[r, c] [pos c > pos r]."""
        cost, start = rt.gather([c.cost.cpu() for c in cands])            # all layers, in order
        order = cost.argsort(stable=True)
        position, gains, at = positions(order), [], [start]
        for c in cands:
            (m, n), s = c.nonzero.shape, at[-1]
            at_r, at_c = (position[s:s + m].to(c.nonzero.device),
                          position[s + m:s + m + n].to(c.nonzero.device))
            later = at_c[None, :] > at_r[:, None]                                   # (m, n)
            gains.append(torch.cat([(c.nonzero & later).sum(1), (c.nonzero & ~later).sum(0)]).cpu())
            at.append(s + m + n)
        added = rt.gather(gains)[0][order].cumsum(0)
        taken = shortest_prefix(cost, order, added, target, zeros)
        return [taken[s:e].to(c.cost.device) for s, e, c in zip(at, at[1:], cands)]

    def update(self, quad: Quadratic, taken, cand: LineCandidates, cfg: Settings, rt):
        rows, cols = taken[:len(quad.W)].nonzero()[:, 0], taken[len(quad.W):].nonzero()[:, 0]
        return remove_lines(quad, rows, cols, cfg)


def structure_of(name: str):
    """'unstructured', 'rowcol' or 'N:M' (0 < N < M) -> its structure, or ValueError."""
    if name == "unstructured":
        return Unstructured()
    if name == "rowcol":
        return RowCol()
    N, _, M = name.partition(":")
    if not (N.isdigit() and M.isdigit() and 0 < int(N) < int(M)):
        raise ValueError(f"structure must be unstructured, rowcol or N:M with 0 < N < M (units: "
                         f"units.py), got {name!r}")
    return NM(int(N), int(M))


# ----------------------------------------------------------------------------------------------
# 7. Interleaved low-rank first-order updates (Sec. 3.5; on for rows and columns). Every layer gets
#    W~ <- W~ + (U V^T) * keep, its keep mask at the start of the phase, U (m, r) starting at zero,
#    V (k, r) random; a few Adam steps on the calibration windows with the curvature's loss, then
#    the product is folded into the weights. The mask keeps every structure: removed entries stay 0.


def low_rank_phase(model: nn.Module, layers: dict[str, nn.Linear], batches, cfg: Settings,
                   seed: int = 0, progress=None):
    """Adds, trains and folds the adapters; `seed` makes their start reproducible."""
    gen, adapters = torch.Generator().manual_seed(seed), {}
    for name, layer in layers.items():
        W = get_matrix(layer)                                                   # (m, k)
        V = (torch.randn(W.shape[1], cfg.lora_rank, generator=gen) / W.shape[1]**0.5).to(W.device)
        U = torch.zeros(len(W), cfg.lora_rank, device=W.device)
        adapters[name] = (U.requires_grad_(), V.requires_grad_(), W != 0)      # keep: bool

    def delta(U, V, keep):                                                   # (U V^T) * keep
        return torch.where(keep, U @ V.T, 0.0)

    def adapter_output(x, U, V, keep, n_in, bias):                  # x dW^T in float32
        dW = delta(U, V, keep)
        return F.linear(x.float(), dW[:, :n_in], dW[:, -1] if bias else None).to(x.dtype)

    def hook(name):            # dW is recomputed in the backward pass, not kept: a model's size
        def add(layer, inputs, y):
            return y + checkpoint(adapter_output, inputs[0], *adapters[name],
                                  layer.in_features, layer.bias is not None, use_reentrant=False)
        return add

    opt = torch.optim.Adam([t for U, V, _ in adapters.values() for t in (U, V)], lr=cfg.lora_lr)
    hooks = {layer: hook(name) for name, layer in layers.items()}
    with frozen_with_hooks(model, hooks), torch.enable_grad():
        for step in progress(range(cfg.lora_steps), "low-rank") if progress else \
                range(cfg.lora_steps):
            ids = batches[step % len(batches)]
            loss = next_token_loss(model, ids) / len(ids)
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        for name, layer in layers.items():
            set_matrix(layer, get_matrix(layer) + delta(*adapters[name]).double())


# ----------------------------------------------------------------------------------------------
# 8. The runtime, and the multi-shot loop (Sec. 3.6): shot t of `shots` removes up to
#    sparsity * t / shots of the weights, with A and G estimated again on the partly pruned
#    model each time.


class Runtime:
    """What a shot asks of the machine: here one process, the code above (scale.py: faster)."""

    def own(self, layers: dict) -> dict:            # the layers this process prunes
        return layers

    def factors(self, model, layers, batches, device=None):
        return kfac_factors(model, layers, batches, device)

    def threshold(self, costs, gains, target, zeros):
        return threshold_select(costs, gains, target, zeros)

    def remove_elements(self, W, A_inv, G_inv, mask, max_correlate):
        return remove_elements(W, A_inv, G_inv, mask, max_correlate)

    def keep(self, quad: Quadratic, kept: dict) -> bool:   # from the costs to the update (else
        return False                                       # computed again: the least memory)

    def gather(self, vectors: list[torch.Tensor]):  # every layer's, in model order, and where
        return torch.cat(vectors), 0                # this process's own begin

    def share(self, layers: dict):                  # the weights from their owners to all
        pass

    @contextmanager
    def stage(self, seconds: dict, name: str):      # timed (processes: one's error is all's)
        tic = time.perf_counter()
        yield
        seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - tic


def count_zeros(layers: dict[str, nn.Linear]) -> int:
    return sum(int((weights_of(layer)[0] == 0).sum()) for layer in layers.values())


def overall_sparsity(layers: dict[str, nn.Linear]) -> float:
    return count_zeros(layers) / max(1, sum(layer.weight.numel() for layer in layers.values()))


def layer_sparsity(layers: dict[str, nn.Linear]) -> dict[str, float]:
    return {name: (weights_of(layer)[0] == 0).float().mean().item()
            for name, layer in layers.items()}


def shot(model, layers, batches, target, cfg: Settings, structure, rt: Runtime, progress,
         t: int = 1):
    """One shot, as the module docstring shows it. Returns the seconds of each stage."""
    seconds, own = {}, rt.own(layers)                                      # one process: all
    with rt.stage(seconds, "curvature"):                                   # Sec. 3.1
        factors = {} if cfg.method == "magnitude" else rt.factors(
            model, own, progress(batches, "curvature"), cfg.curvature_device)
    kept = {}                                  # the models that the runtime keeps for the update

    def quadratic_of(name, layer, keep=False):                             # Sec. 3.2, float64
        quad = kept.pop(name, None) or quadratic(layer, *factors.get(name, (None, None)), cfg, name)
        kept.update({name: quad} if keep and rt.keep(quad, kept) else {})
        return quad

    with rt.stage(seconds, "costs"):                                       # Sec. 3.3-3.4
        cands = [structure.candidates(quadratic_of(name, layer, keep=True), cfg)
                 for name, layer in progress(list(own.items()), "costs")]
        taken = structure.select(cands, target, count_zeros(layers), rt)
    with rt.stage(seconds, "updates"):                                     # Sec. 3.3, Eq. 6-8
        for (name, layer), chosen, cand in zip(progress(list(own.items()), "updates"), taken,
                                               cands):
            set_matrix(layer, structure.update(quadratic_of(name, layer), chosen, cand, cfg, rt))
    rt.share(layers)                                        # from each layer's owner to all
    del factors, cands                       # not needed by the low-rank phase: free them first
    if cfg.lora_steps:                                                     # Sec. 3.5
        with rt.stage(seconds, "lora"):      # every process the same steps on the same model
            low_rank_phase(model, layers, batches, cfg, seed=t, progress=progress)
        rt.share(layers)
    return seconds


def prune(model: nn.Module, batches, settings: Settings, on_shot=None, progress=None,
          first_shot: int = 1, structure=None, runtime: Runtime | None = None):
    """Prune `model` in place. batches: a list of (B, L) token id tensors on the model's device.
    on_shot(record) gets each shot's record (a dict); progress(iterable, description) may wrap the
    long loops (e.g. tqdm); first_shot > 1 continues a run whose earlier shots are in the model;
    structure (section 6) and runtime (section 8) default to settings.structure's and the plain
    one. Returns a report: overall and per-layer sparsity and the record of every shot."""
    cfg, layers, batches = settings, prunable_layers(model), list(batches)
    structure, rt = structure or structure_of(cfg.structure), runtime or Runtime()
    total, records = sum(layer.weight.numel() for layer in layers.values()), []
    for t in range(first_shot, cfg.shots + 1) if cfg.sparsity > 0 else []:
        target = round(cfg.sparsity * total * t / cfg.shots)               # linear schedule

        def labelled(it, desc, t=t):
            return progress(it, f"shot {t}/{cfg.shots} {desc}") if progress else it
        seconds = shot(model, layers, batches, target, cfg, structure, rt, labelled, t)
        records.append({"shot": t, "target": target / total,
                        "sparsity": overall_sparsity(layers), "seconds": seconds})
        if on_shot:
            on_shot(records[-1])
    return {"sparsity": overall_sparsity(layers), "layers": layer_sparsity(layers),
            "shots": records}

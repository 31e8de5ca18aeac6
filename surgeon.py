"""The LLM Surgeon, in one file.

A reference implementation of van der Ouderaa, Nagel, van Baalen, Asano and Blankevoort,
"The LLM Surgeon", ICLR 2024 (arXiv 2312.17244). Read it top to bottom beside the paper. First
the method, in the order a shot runs it:

  1. settings                          5. OBS updates (Sec. 3.3, Eq. 6-8)
  2. the layers that are pruned        6. structures (weights, N:M groups, rows and columns; heads
  3. KFAC curvature (Sec. 3.1, Eq. 3)     and MLP units, beyond the paper): candidates, the global
                                          threshold (Sec. 3.4), what the update removes
  4. damping, the quadratic model      7. interleaved low-rank updates (Sec. 3.5)
     and its costs (Sec. 3.2-3.3)      8. the multi-shot loop (Sec. 3.6)

then the machinery, which the method does not need to be understood: 9. checks, precision and
failure messages, 10. fast paths (each the same computation as a plain version, which the tests hold it
to), 11. several processes (torch.distributed). "Sec." is the paper's, "section" this file's.

One shot t of `shots` (`shot`, called by `prune` for t = 1 .. shots):
    target = sparsity * t / shots * weights                  # linear schedule (Sec. 3.6)
    A, G = kfac_factors(model, layers, batches)              # Sec. 3.1: a backward pass a window
    for each layer:
        quad = quadratic(layer, A, G)                        # Sec. 3.2: A_hat, G_hat, inverses
        candidates += structure.candidates(quad)             # Sec. 3.3: OBS cost of every candidate
    taken = structure.select(candidates, target)             # Sec. 3.4: one threshold, all layers
    for each layer:
        quad = quadratic(layer, A, G)                        # again: one layer at a time
        W~ = structure.update(quad, taken, candidates)       # Sec. 3.3: OBS update, Eq. 6-8
    low_rank_phase(model, layers, batches)                   # Sec. 3.5, if lora_steps > 0

Notation, one meaning per symbol. A linear layer computes y = W x + b with W of shape (m, n);
with a bias we work with the augmented W~ = [W | b] of shape (m, k = n+1) and input a~ = [x; 1],
without one W~ = W, k = n. theta = vec(W~) row-major, so one token's gradient is g (x) a~ with
g = dloss/dy. The Fisher of a layer is approximated by F = G (x) A, A = E[a~ a~^T] (k, k),
G = E[g g^T] (m, m), both undamped; A_hat, G_hat are damped, A_inv, G_inv the inverses of
A_hat, G_hat; alpha (k,), gamma (m,) the precisions of single coordinates; dW an update; cost a
candidate's loss increase; quad one layer's quadratic model (the paper's q is an index).

Precision. The model keeps its dtype (float32, bfloat16 or float16): x and g are cast to float32
before the outer products, costs and updates are float64, W~ is written back rounded to the
model's dtype (a removed weight as an exact 0), and the low-rank adapters train in float32.

Memory. A shot holds the model, the factors (float32, one A per input tensor that several layers
read, on `curvature_device`), one float32 cost per candidate, and the float64 workspace of one
layer at a time: its inverses are computed for the costs and again for the update.

Depends on torch only. Works on any module whose prunable layers are nn.Linear (OPT, Llama, ...),
on whatever device the model is on.
"""
import itertools
import math
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

METHODS = ("surgeon", "kobd", "lobd", "magnitude")
REMOVED = -1.0              # cost of a candidate that is already removed: always taken, gains 0
LINES = ("rowcol", "units")  # the structures that remove whole rows and columns


# ----------------------------------------------------------------------------------------------
# 1. Settings


@dataclass
class Settings:
    sparsity: float = 0.5             # fraction of the pruned layers' weights that end at zero
    structure: str = "rowcol"         # "unstructured" | "N:M" (2:4, 4:8, ...) | "rowcol" | "units"
    method: str = "surgeon"           # "surgeon" | "kobd" | "lobd" | "magnitude" (Sec. 4 baselines)
    shots: int | None = None          # None: rowcol, units 1.25% a shot (paper: 24 to 30%);
                                      # 5 for unstructured and N:M (paper)
    damp_a: float = 0.01              # lambda_A, relative to the mean live diagonal of A
    damp_g: float = 0.1               # lambda_G, likewise (the paper: 0.01 for rowcol)
    damp_costs: bool = False          # rowcol, units: the costs' forms w^T A w, w^T G w with
                                      # the undamped A, G as the authors' code; True: A_hat, G_hat
    max_correlate: int = 1            # most removed weights solved together in an element update:
                                      # 1 is a row at a time (the authors' code: 2000)
    curvature_device: str | None = None   # where A and G live; None: the model's device
    lora_steps: int | None = None     # interleaved low-rank steps after each shot (0: off);
                                      # None: 3 for LLM Surgeon on rowcol, units, else 0
    lora_rank: int = 8
    lora_lr: float = 1e-4
    unit_cost: str = "cut"            # units: "cut", the OBS cost of a unit's cheapest cut;
                                      # "lines", the sum of its lines' costs

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
    """(weight, bias): the layer's parameters, or what layer.read_weights() returns for a layer
    whose weights live elsewhere (offloaded to host memory or disk, say)."""
    read = getattr(layer, "read_weights", None)
    return read() if read else (layer.weight.detach(), layer.bias)


def get_matrix(layer: nn.Linear) -> torch.Tensor:
    """W~ = [W | b] in float64, (m, n+1) with a bias, (m, n) without."""
    W, b = weights_of(layer)
    W = W.detach().double()
    return W if b is None else torch.cat([W, b.detach().double()[:, None]], 1)


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
    gg_sum[name] = sum g g^T of every layer. The last position of a window has no label and is
    left out."""

    def __init__(self, device):
        self.device = device
        self.xx_sum, self.x_sum, self.gg_sum = {}, {}, {}
        self.source = {}                   # layer -> the layer whose input sums it shares
        self.last_input = self.last_name = None
        self.batch_shape = None            # (B, L) of the batch running now
        self.tokens = 0

    def labelled(self, z):                 # (B, L, d) or (B*L, d) -> (B*(L-1), d) on device
        B, L = self.batch_shape
        return z.reshape(B, L, z.shape[-1])[:, :-1].reshape(-1, z.shape[-1]).to(self.device,
                                                                              torch.float32)

    def start_batch(self, ids):
        self.batch_shape, self.last_input = ids.shape, None
        self.tokens += ids.shape[0] * (ids.shape[1] - 1)

    def forward_hook(self, name, record=True):
        """record=False: the gradient starts here as well, so that every rank's autograd graph
        is the single process's, but this layer (another rank's) is not recorded."""
        def hook(layer, inputs, y):
            x = inputs[0]
            if record and x is self.last_input:              # q, k, v (gate, up) read one tensor
                self.source[name] = self.last_name
            elif record:
                self.source[name] = self.last_name = name
                self.last_input = x
                x = self.labelled(x.detach())                                   # (tokens, n)
                add_gram(self.xx_sum.setdefault(name, x.new_zeros(x.shape[1], x.shape[1])), x)
                self.x_sum[name] = self.x_sum.get(name, 0) + x.sum(0)
            if not y.requires_grad:                        # parameters are frozen: let the
                y.requires_grad_()                         # gradient start here
            if record:
                y.register_hook(self.backward_hook(name))
            return y
        return hook

    def backward_hook(self, name):
        def hook(g):
            g = self.labelled(g)                                                # (tokens, m)
            add_gram(self.gg_sum.setdefault(name, g.new_zeros(g.shape[1], g.shape[1])), g)
        return hook


@contextmanager
def frozen_with_hooks(model, hooks: dict):
    """Parameters frozen (no weight gradients), eval mode, forward hooks {module: hook} on; all
    restored afterwards."""
    params = list(model.parameters())
    needs_grad, was_training = [p.requires_grad for p in params], model.training
    handles = [module.register_forward_hook(hook) for module, hook in hooks.items()]
    try:
        model.eval()
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for h in handles:
            h.remove()
        for p, r in zip(params, needs_grad):
            p.requires_grad_(r)
        model.train(was_training)


def kfac_factors(model: nn.Module, layers: dict[str, nn.Linear], batches, device=None,
                 record=None):
    """A and G of every layer in `record` (default: all of `layers`; several processes record
    only their own), averaged over the labelled tokens. Returns {name: (A, G)} in float32 on
    `device` (default: the model's); A is (k, k), with the bias coordinate where the layer has a
    bias. Layers that read the same input tensor share one A object."""
    device = device or next(model.parameters()).device
    record = layers if record is None else record
    rec = Recorder(device)
    hooks = {layer: rec.forward_hook(name, name in record) for name, layer in layers.items()}
    with frozen_with_hooks(model, hooks), factor_memory_note(rec, record, device):
        for ids in batches:
            rec.start_batch(ids)
            with torch.enable_grad():                                # also under no_grad
                next_token_loss(model, ids).backward()
    rec.last_input = None             # it holds the autograd graph, whose hooks hold rec: a cycle
    factors = assemble_factors(rec, record)
    check_finite(factors)
    return factors


def assemble_factors(rec: Recorder, layers):
    """Averages, the bias coordinate a~ = [x; 1] of A, and one A object per shared input."""
    n_tokens, A_of, factors = rec.tokens, {}, {}
    for name, layer in layers.items():
        src = rec.source[name]
        if src not in A_of:
            A = mirror(rec.xx_sum[src]).div_(n_tokens)                          # E[x x^T]
            if layer.bias is not None:
                mean = (rec.x_sum[src] / n_tokens)[:, None]                     # E[x]
                A = torch.cat([torch.cat([A, mean], 1),
                               torch.cat([mean.T, mean.new_ones(1, 1)], 1)])
            A_of[src] = A
        m = layer.out_features
        G = mirror(rec.gg_sum[name]).div_(n_tokens) if name in rec.gg_sum \
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
    X_inv_live = row_major(torch.cholesky_inverse(L))
    del L
    if everything:                                          # no copies into zero-padded ones
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
#    F^-1 = G_inv (x) A_inv.
#    The OBD baselines make no update: they only zero what they remove.


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


def remove_elements(W, A_inv, G_inv, mask, max_correlate, fast=True):
    """Remove the weights in `mask` (m, k) with correlated OBS updates (Eq. 7-8). The exact
    system C_qq' = G_inv[i_q, i_q'] A_inv[j_q, j_q'] is solved in chunks of whole rows holding at
    most max_correlate removed weights, each chunk on the weights as updated by those before it;
    everything in the mask is zeroed at the end. G = I and one row a chunk is per-row OBS.
    Chunk R's update is dW = -G_inv[:, R] E_R A_inv with E_R = C^-1 w_Q on Q (zero elsewhere).
    fast: the same chunks, updates collected over blocks of rows (remove_elements_lazily)."""
    if fast:
        return remove_elements_lazily(W, A_inv, G_inv, mask, max_correlate)
    W = W.to(G_inv.dtype).clone()
    solve = mask & (G_inv.diagonal()[:, None] > 0) & (A_inv.diagonal()[None, :] > 0)
    for R in _row_chunks(solve.sum(1).tolist(), max_correlate):
        R = torch.tensor(R, device=W.device)
        r, j = solve[R].nonzero(as_tuple=True)                              # Q in chunk R
        i = R[r]
        C = G_inv[i][:, i] * A_inv[j][:, j]                                 # Eq. 7
        E = W.new_zeros(len(R), W.shape[1])                                 # E_R (|R|, k)
        E[r, j] = torch.linalg.solve(C, W[i, j])
        W -= G_inv[:, R] @ E @ A_inv                                        # Eq. 8
    W[mask] = 0
    return W


def _row_chunks(counts: list[int], max_correlate: int):
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
#    target, zeros, ranks) -> the taken ones per layer, and update(quad, taken, candidates, cfg)
#    -> the new W~. Zeros count whatever made them: a candidate adds only the nonzero weights it
#    zeroes, and candidates already removed cost REMOVED (always taken). Adding a structure is
#    one class here. `ranks` is OneProcess (section 11) unless torch.distributed runs.


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


def shortest_prefix(cost, order, added, target, zeros):
    """(c,) bool: the candidates in the shortest prefix of `order` (cost order, already removed
    ones first and always taken) whose added zeros (cumulative, in that order) reach target."""
    take = max(int((cost == REMOVED).sum()),
               min(len(cost), int((zeros + added < target).sum()) + (target > zeros)))
    taken = torch.zeros(len(cost), dtype=torch.bool, device=cost.device)
    taken[order[:take]] = True
    return taken


def threshold_select(costs, gains, target, zeros, ranks, fast=True):
    """Fixed gains per candidate: the shortest prefix of all candidates in cost order (a stable
    sort over the layers in turn; already removed ones first) whose gains reach `target` zeros.
    fast (and several processes): the same set without a sort (radix_select)."""
    if fast or ranks.size > 1:
        return radix_select(costs, gains, target, zeros, ranks)
    cost, gain = torch.cat(costs), torch.cat(gains).long()
    order = cost.argsort(stable=True)                                      # REMOVED < 0: first
    taken = shortest_prefix(cost, order, gain[order].cumsum(0), target, zeros)
    return list(taken.split([len(c) for c in costs]))


class Elements:
    """Structures of single weights: the update removes a mask of them (Sec. 3.3, Eq. 7-8)."""

    def select(self, cands: list[Candidates], target: int, zeros: int, ranks):
        return threshold_select([c.cost for c in cands], [c.gain for c in cands], target, zeros,
                                ranks)

    def update(self, quad: Quadratic, taken, cand: Candidates, cfg: Settings):
        """Weights already zero stay zero: they are constraints of the update."""
        W = quad.W.clone()
        mask = F.pad(self.mask(quad, taken, cand) | quad.removed,
                     (0, W.shape[1] - quad.n_in))                                   # no bias
        if cfg.method == "surgeon":                            # OBD makes no update (Sec. 4)
            return remove_elements(W, quad.A_inv, quad.G_inv, mask, cfg.max_correlate)
        return W.masked_fill(mask, 0)


class Unstructured(Elements):
    """A candidate is one weight."""
    name = "unstructured"

    def candidates(self, quad: Quadratic, cfg: Settings) -> Candidates:
        n = quad.n_in
        cost = element_costs(quad.W[:, :n].masked_fill(quad.removed, 0), quad.alpha[:n],
                             quad.gamma)
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

    def select(self, cands: list[GroupCandidates], target: int, zeros: int, ranks):
        if target >= self.N * int(ranks.sum(torch.tensor(sum(len(c.cost) for c in cands)))):
            return [torch.ones_like(c.cost, dtype=torch.bool) for c in cands]
        return super().select(cands, target, zeros, ranks)

    def mask(self, quad: Quadratic, taken, cand: GroupCandidates):
        return (cand.choice & taken.reshape(*cand.choice.shape[:2], 1)).reshape(quad.removed.shape)


class RowCol:
    """A candidate is a whole row (an output, with its bias) or column (an input) of a layer;
    the bias column is never one."""
    name = "rowcol"

    def candidates(self, quad: Quadratic, cfg: Settings) -> LineCandidates:
        A, G = (quad.A_hat, quad.G_hat) if quad.A_hat is not None else (quad.A, quad.G)
        nonzero = ~quad.removed
        rows = row_costs(quad.W, A, quad.gamma).masked_fill(~nonzero.any(1), REMOVED)
        cols = column_costs(quad.W, G, quad.alpha)[:quad.n_in].masked_fill(~nonzero.any(0),
                                                                           REMOVED)
        return LineCandidates(torch.cat([rows, cols]).float(), nonzero)

    def select(self, cands: list[LineCandidates], target: int, zeros: int, ranks):
        """Sort all rows and columns (few; several processes gather them all); each one's gain
        follows from the global order: a row r adds the nonzeros of its columns taken after it,
        sum_c nz[r, c] [position c > position r]."""
        lines = lambda layer: layer.out_features + layer.in_features            # noqa: E731
        lengths = [lines(layer) for layer in ranks.layers.values()]
        flat = ranks.concat([c.cost.cpu() for c in cands], lengths)
        order = flat.argsort(stable=True)
        position = torch.empty_like(order)
        position[order] = torch.arange(len(order))
        mine = list(ranks.own(ranks.layers))
        starts = dict(zip(ranks.layers, itertools.accumulate(
            (lines(l) for l in ranks.layers.values()), initial=0)))
        gains = []
        for name, c in zip(mine, cands):
            (m, n), start = c.nonzero.shape, starts[name]
            at_r, at_c = (position[start:start + m].to(c.nonzero.device),
                          position[start + m:start + m + n].to(c.nonzero.device))
            later = at_c[None, :] > at_r[:, None]                                   # (m, n)
            gains.append(torch.cat([(c.nonzero & later).sum(1), (c.nonzero & ~later).sum(0)]).cpu())
        added = ranks.concat(gains, lengths)[order].cumsum(0)
        taken = shortest_prefix(flat, order, added, target, zeros)
        return [taken[starts[name]:starts[name] + len(c.cost)].to(c.cost.device)
                for name, c in zip(mine, cands)]

    def update(self, quad: Quadratic, taken, cand: LineCandidates, cfg: Settings):
        """Exact joint OBS (surgeon); weights that were zero are zeroed again after it."""
        W = quad.W.clone()
        rows, cols = taken[:len(W)].nonzero()[:, 0], taken[len(W):].nonzero()[:, 0]
        if cfg.method == "surgeon":
            W = remove_rows_columns(W, quad.A_inv, quad.G_inv, rows, cols)
        W[rows], W[:, cols] = 0, 0
        W[:, :quad.n_in][quad.removed] = 0
        return W


@dataclass
class UnitGroup:
    """Units of one kind in one block, e.g. its MLP units or its attention heads; built by the
    caller, who knows the architecture. Unit u owns, in each of `lines` (layer name, "rows" or
    "cols", width w), the indices u*w .. u*w + w - 1; zeroing one of its `cuts` (indices into
    `lines`) silences it alone. A `shared` line (layer name, axis, width, k) belongs to k
    consecutive units together and is dead once all of them are gone (grouped-query k, v)."""
    count: int
    lines: list[tuple[str, str, int]]
    cuts: list[int]
    shared: list[tuple[str, str, int, int]] = field(default_factory=list)


def block_costs(W, X, P, width):
    """(m / width,) costs 1/2 tr(P_b W_b X W_b^T) of removing the row blocks W_b (width rows
    each) of W: OBS for rows R with P_b = (G_inv_RR)^-1, X = A (Sec. 3.3, Eq. 5), or the OBD
    form with P_b = G_RR. Columns: the same on W^T with the A side's P_b and X = G."""
    M = W @ X if X is not None else W
    S = M.reshape(-1, width, W.shape[1]) @ W.reshape(-1, width, W.shape[1]).mT      # (b, w, w)
    return 0.5 * (P * S).sum((1, 2))


def block_precisions(F_inv, F, precision, width, method):
    """(b, w, w) precisions of consecutive blocks of one side's coordinates: surgeon
    (F_inv_bb)^-1, K-OBD and L-OBD the undamped F_bb, else I; zero on dead coordinates (where
    precision, the single coordinates' alpha or gamma, is 0)."""
    live = (precision != 0).reshape(-1, width).to(precision.dtype)               # (b, w)
    idx = torch.arange(len(precision), device=precision.device).reshape(-1, width)
    if method == "surgeon":
        X = F_inv[idx[:, :, None], idx[:, None, :]] + torch.diag_embed(1 - live)
        P = torch.linalg.inv(X)
    elif F is not None:
        P = F[idx[:, :, None], idx[:, None, :]]
    else:
        P = torch.diag_embed(torch.ones_like(live))
    return P * live[:, :, None] * live[:, None, :]


@dataclass
class UnitCandidates:
    """One layer's share of the units: cost (c,) of each priced line in this layer (the cuts, or
    every line with unit_cost "lines"), one after the other, then nonzero (l,) counts of each
    unit line and shared line block in it."""
    cost: torch.Tensor
    nonzero: torch.Tensor


class Units:
    """A candidate is a unit a model can lose whole: an attention head or an MLP unit (beyond
    the paper, from its framework: under KFAC the layers are independent). Its cost is the
    cheapest of its cuts, each the exact joint OBS cost of the cut's lines in its one layer (or,
    with unit_cost "lines", the sum of the costs of all its lines); its gain every nonzero
    weight of all its lines; the update is the cut layer's exact
    rows-or-columns update (Eq. 6), then the unit's other lines, which do nothing now, zeroed."""
    name = "units"

    def __init__(self, groups: list[UnitGroup], cost: str = "cut"):
        self.groups, self.summed = groups, cost == "lines"
        self.priced = [list(range(len(group.lines))) if self.summed else group.cuts
                       for group in groups]                  # the lines whose costs count
        self.slots = {}          # layer -> [(group, line index or None, shared index, priced)]
        for g, group in enumerate(groups):
            for i, (layer, _, _) in enumerate(group.lines):
                self.slots.setdefault(layer, []).append((g, i, None, i in self.priced[g]))
            for j, (layer, *_) in enumerate(group.shared):
                self.slots.setdefault(layer, []).append((g, None, j, False))

    def sizes(self, name):
        """(line costs, nonzero counts) in this layer's UnitCandidates."""
        priced = sum(self.groups[g].count for g, _, _, p in self.slots.get(name, ()) if p)
        counts = sum(self.groups[g].count // (1 if i is not None else self.groups[g].shared[j][3])
                     for g, i, j, _ in self.slots.get(name, ()))
        return priced, counts

    def line(self, g, i, j):
        """(layer, axis, width) of a unit line i or a shared line j of group g."""
        return self.groups[g].lines[i] if i is not None else self.groups[g].shared[j][:3]

    def candidates(self, quad: Quadratic, cfg: Settings) -> UnitCandidates:
        A, G = (quad.A_hat, quad.G_hat) if quad.A_hat is not None else (quad.A, quad.G)
        W = quad.W.masked_fill(F.pad(quad.removed, (0, quad.W.shape[1] - quad.n_in)), 0)
        costs, counts = [], []
        for g, i, j, priced in self.slots.get(quad.name, ()):
            _, axis, width = self.line(g, i, j)
            lines = W if axis == "rows" else W[:, :quad.n_in].T                # (lines, ...)
            counts.append((lines != 0).reshape(-1, width * lines.shape[1]).sum(1))
            if priced and axis == "rows":
                P = block_precisions(quad.G_inv, quad.G, quad.gamma, width, cfg.method)
                costs.append(block_costs(W, A, P, width))
            elif priced:
                P = block_precisions(quad.A_inv, quad.A, quad.alpha[:quad.n_in], width,
                                     cfg.method)                                  # no bias
                costs.append(block_costs(W[:, :quad.n_in].T, G, P, width))
        return UnitCandidates(torch.cat(costs).float() if costs else W.new_zeros(0).float(),
                              torch.cat(counts) if counts else W.new_zeros(0, dtype=torch.long))

    def select(self, cands: list[UnitCandidates], target: int, zeros: int, ranks):
        """Every unit's cost, cut and gain from all layers' shares (several processes gather
        them); then, as for rows and columns, the shortest prefix in cost order whose zeros reach
        the target, a shared line's zeros counted with the last of its units."""
        layers = list(ranks.layers)
        sizes = [self.sizes(name) for name in layers]
        cost = ranks.concat([c.cost.cpu() for c in cands], [s[0] for s in sizes])
        count = ranks.concat([c.nonzero.cpu() for c in cands], [s[1] for s in sizes])
        line_cost, own, shared = self._per_group(layers, cost, count)
        cut_cost = [c[:, [self.priced[g].index(i) for i in group.cuts]]
                    for g, (c, group) in enumerate(zip(line_cost, self.groups))]
        unit_cost = torch.cat([c.sum(1) for c in line_cost] if self.summed else
                              [c.min(1).values for c in cut_cost])
        gain = torch.cat(own)
        unit_cost[gain == 0] = REMOVED                       # nothing left: always taken
        order = unit_cost.argsort(stable=True)
        position = torch.empty_like(order)
        position[order] = torch.arange(len(order))
        bonus, start = torch.zeros_like(gain), 0
        for group, nz in zip(self.groups, shared):           # zeros of a shared block: with
            for (*_, k), blocks in zip(group.shared, nz):    # the last of its units
                last = position[start:start + group.count].reshape(-1, k).argmax(1)
                bonus[start + torch.arange(len(blocks)) * k + last] += blocks
            start += group.count
        taken = shortest_prefix(unit_cost, order, (gain + bonus)[order].cumsum(0), target, zeros)
        choice = torch.cat([c.argmin(1) for c in cut_cost])
        return [self._layer_lines(name, taken, choice) for name in ranks.own(ranks.layers)]

    def _per_group(self, layers, cost, count):
        """Split the gathered vectors: per group, (units, priced lines) costs, own nonzeros
        (units,) and the nonzeros of each shared line's blocks."""
        line_cost = [torch.empty(gr.count, len(p)) for gr, p in zip(self.groups, self.priced)]
        own = [torch.zeros(gr.count, dtype=torch.long) for gr in self.groups]
        shared = [[None] * len(gr.shared) for gr in self.groups]
        at_cost, at_count = 0, 0
        for name in layers:
            for g, i, j, priced in self.slots.get(name, ()):
                group = self.groups[g]
                if priced:
                    line_cost[g][:, self.priced[g].index(i)] = cost[at_cost:at_cost + group.count]
                    at_cost += group.count
                n = group.count if i is not None else group.count // group.shared[j][3]
                if i is not None:
                    own[g] += count[at_count:at_count + n]
                else:
                    shared[g][j] = count[at_count:at_count + n]
                at_count += n
        return line_cost, own, shared

    def _layer_lines(self, name, taken, choice):
        """This layer's lines to remove: {(axis, "cut" or "dead"): indices}."""
        lines = {}
        starts = list(itertools.accumulate((group.count for group in self.groups), initial=0))
        for g, i, j, _ in self.slots.get(name, ()):
            group = self.groups[g]
            _, axis, width = self.line(g, i, j)
            units = taken[starts[g]:starts[g] + group.count]
            if i is not None:
                cut = choice[starts[g]:starts[g] + group.count] == group.cuts.index(i) \
                    if i in group.cuts else torch.zeros_like(units)
                kinds = (("cut", units & cut), ("dead", units & ~cut))
            else:
                kinds = (("dead", units.reshape(-1, group.shared[j][3]).all(1)),)
            for kind, blocks in kinds:
                idx = (blocks.nonzero()[:, :1] * width + torch.arange(width)).flatten()
                lines[axis, kind] = torch.cat([lines.get((axis, kind), idx[:0]), idx])
        return lines

    def update(self, quad: Quadratic, taken: dict, cand: UnitCandidates, cfg: Settings):
        """The cut lines by exact joint OBS (surgeon), then the dead ones zeroed; weights that
        were zero are zeroed again."""
        W = quad.W.clone()
        none = torch.zeros(0, dtype=torch.long)
        rows, cols = (taken.get((axis, "cut"), none).to(W.device) for axis in ("rows", "cols"))
        if cfg.method == "surgeon" and len(rows) + len(cols):
            W = remove_rows_columns(W, quad.A_inv, quad.G_inv, rows, cols)
        for axis in ("rows", "cols"):
            for kind in ("cut", "dead"):
                idx = taken.get((axis, kind), none).to(W.device)
                if axis == "rows":
                    W[idx] = 0
                else:
                    W[:, idx] = 0
        W[:, :quad.n_in][quad.removed] = 0
        return W


def structure_of(name: str, units: list[UnitGroup] | None = None, cost: str = "cut"):
    """'unstructured', 'rowcol', 'units' (with its groups) or 'N:M' (0 < N < M) -> its
    structure, or ValueError."""
    if name == "unstructured":
        return Unstructured()
    if name == "rowcol":
        return RowCol()
    if name == "units":
        return Units(units or [], cost)
    N, _, M = name.partition(":")
    if not (N.isdigit() and M.isdigit() and 0 < int(N) < int(M)):
        raise ValueError(f"structure must be unstructured, rowcol, units or N:M with 0 < N < M, "
                         f"got {name!r}")
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
# 8. The multi-shot loop (Sec. 3.6): shot t of `shots` removes up to sparsity * t / shots of the
#    weights, with A and G estimated again on the partly pruned model each time.


def count_zeros(layers: dict[str, nn.Linear]) -> int:
    return sum(int((weights_of(layer)[0] == 0).sum()) for layer in layers.values())


def overall_sparsity(layers: dict[str, nn.Linear]) -> float:
    return count_zeros(layers) / sum(layer.weight.numel() for layer in layers.values())


def layer_sparsity(layers: dict[str, nn.Linear]) -> dict[str, float]:
    return {name: (weights_of(layer)[0] == 0).float().mean().item()
            for name, layer in layers.items()}


def shot(model, layers, batches, target, cfg: Settings, progress, t: int = 1, ranks=None,
         structure=None):
    """One shot, as the module docstring shows it. Returns the seconds of each stage. With
    several processes (ranks, section 11) each does sections 3-6 for the layers it owns."""
    structure, seconds = structure or structure_of(cfg.structure), {}
    ranks = ranks or OneProcess(layers)
    own = ranks.own(layers)                                               # one process: all
    with stage(seconds, "curvature", ranks):                               # Sec. 3.1
        factors = {} if cfg.method == "magnitude" else kfac_factors(
            model, layers, progress(batches, "curvature"), cfg.curvature_device, record=own)

    def quadratic_of(name, layer):                                         # Sec. 3.2, float64
        return quadratic(layer, *factors.get(name, (None, None)), cfg, name)

    with stage(seconds, "costs", ranks):                                   # Sec. 3.3-3.4
        cands = [structure.candidates(quadratic_of(name, layer), cfg)
                 for name, layer in progress(list(own.items()), "costs")]
        taken = structure.select(cands, target, count_zeros(layers), ranks)
    with stage(seconds, "updates", ranks):                                 # Sec. 3.3, Eq. 6-8
        for (name, layer), chosen, cand in zip(progress(list(own.items()), "updates"), taken,
                                               cands):
            set_matrix(layer, structure.update(quadratic_of(name, layer), chosen, cand, cfg))
    ranks.share_weights()                                   # from each layer's owner to all
    del factors, cands                       # not needed by the low-rank phase: free them first
    if cfg.lora_steps:                                                     # Sec. 3.5
        with stage(seconds, "lora", ranks):  # every process the same steps on the same model
            low_rank_phase(model, layers, batches, cfg, seed=t, progress=progress)
        ranks.share_weights()
    return seconds


def prune(model: nn.Module, batches, settings: Settings, on_shot=None, progress=None,
          first_shot: int = 1, units: list[UnitGroup] | None = None):
    """Prune `model` in place. batches: a list of (B, L) token id tensors on the model's device.
    on_shot(record) is called after each shot with that shot's record (a dict); progress(iterable,
    description) may wrap the long loops (e.g. tqdm); first_shot > 1 continues a run whose
    earlier shots are already in the model; units: the model's heads and MLP units, for
    structure "units". Returns a report: overall and per-layer sparsity and the record of every
    shot."""
    cfg, layers, batches = settings, prunable_layers(model), list(batches)
    check(cfg, layers, batches, units)
    structure = structure_of(cfg.structure, units, cfg.unit_cost)
    ranks = processes(layers)               # several when torch.distributed is initialized
    total, records = sum(layer.weight.numel() for layer in layers.values()), []
    with highest_precision(), failure_note(layers, cfg.shots, records, first_shot):
        for t in range(first_shot, cfg.shots + 1) if cfg.sparsity > 0 else []:
            target = round(cfg.sparsity * total * t / cfg.shots)           # linear schedule
            labelled = _labelled(progress, t, cfg.shots)
            seconds = shot(model, layers, batches, target, cfg, labelled, t, ranks, structure)
            records.append({"shot": t, "target": target / total,
                            "sparsity": overall_sparsity(layers), "seconds": seconds})
            if on_shot:
                on_shot(records[-1])
    return {"sparsity": overall_sparsity(layers), "layers": layer_sparsity(layers),
            "shots": records}


# ==============================================================================================
# The machinery: what the method needs to run well, not to be understood.
# ----------------------------------------------------------------------------------------------
# 9. Checks before a weight is touched, precision, stages, and failure messages


def check(settings: Settings, layers=None, batches=None, units=None):
    """Raise ValueError for anything that would fail later, before a weight is touched. Without
    layers and batches, checks the settings alone."""
    cfg = settings
    structure = structure_of(cfg.structure)
    if cfg.method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {cfg.method!r}")
    if not 0 <= cfg.sparsity < 1:
        raise ValueError(f"sparsity must be in [0, 1), got {cfg.sparsity}")
    if cfg.unit_cost not in ("cut", "lines"):
        raise ValueError(f"unit_cost must be 'cut' or 'lines', got {cfg.unit_cost!r}")
    for name, low, strict in (("shots", 1, False), ("max_correlate", 1, False),
                              ("damp_a", 0, False), ("damp_g", 0, False),
                              ("lora_steps", 0, False), ("lora_rank", 1, False),
                              ("lora_lr", 0, True)):
        value = getattr(cfg, name)
        if not (math.isfinite(value) and (value > low if strict else value >= low)):
            raise ValueError(f"{name} must be a finite number {'>' if strict else '>='} {low}, "
                             f"got {value}")
    if isinstance(structure, NM) and cfg.sparsity > structure.N / structure.M:
        raise ValueError(f"{structure.name} removes at most {structure.N}/{structure.M} of the "
                         f"weights; sparsity {cfg.sparsity} cannot be met")
    if cfg.curvature_device is not None:
        check_device(cfg.curvature_device)
    if layers is None:
        return
    if not layers:
        raise ValueError("the model has no prunable nn.Linear layers")
    odd = [name for name, layer in layers.items()
           if isinstance(structure, NM) and layer.in_features % structure.M]
    if odd:
        raise ValueError(f"{structure.name} needs input widths divisible by {structure.M}; not so "
                         f"for {odd[:3]}")
    if cfg.structure == "units":
        check_units(units, layers)
    needs_data = cfg.method != "magnitude" or cfg.lora_steps > 0
    if needs_data and cfg.sparsity > 0 and len(batches) == 0:
        raise ValueError("calibration data is empty")


def check_units(units, layers):
    """Units need their groups; every line must fit its layer, and every line of a layer's
    weights belong to one unit at most."""
    if not units:
        raise ValueError("structure 'units' needs the model's units: prune(..., units=...), "
                         "e.g. from compact.units(model)")
    for group in units:
        for name, axis, width, *shared in (*group.lines, *group.shared):
            layer = layers.get(name)
            n = group.count // (shared[0] if shared else 1) * width
            size = layer and (layer.out_features if axis == "rows" else layer.in_features)
            if layer is None or axis not in ("rows", "cols") or n != size:
                raise ValueError(f"unit lines ({name}, {axis}, {width}) x {n // width} do not "
                                 f"match a prunable layer's {axis} ({size})")


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
def factor_memory_note(rec, record, device):
    """Out of memory while the factors accumulate: how much they take, and what to do."""
    try:
        yield
    except torch.OutOfMemoryError as err:
        rec.last_input = None
        need = factor_bytes(record, rec.source) / 2**30
        raise MemoryError(f"out of memory on {device} while accumulating the curvature factors, "
                          f"which take about {need:.1f} GiB there (at most); keep them in host "
                          "memory with curvature_device='cpu' (--curvature-device cpu)") from err


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
def timed(seconds: dict, name: str):
    tic = time.perf_counter()
    yield
    seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - tic


@contextmanager
def stage(seconds: dict, name: str, ranks):
    """A stage of a shot: timed into seconds[name]; an error on one process is raised on all."""
    with timed(seconds, name), ranks.together():
        yield


@contextmanager
def failure_note(layers, shots, records, first_shot):
    """An error inside a shot gets a note: which shot, and how much of the model is zero now."""
    try:
        yield
    except Exception as err:
        done = records[-1]["shot"] if records else first_shot - 1
        err.add_note(f"shot {done + 1} of {shots} failed; {overall_sparsity(layers):.1%} of the "
                     "weights are zero now")
        raise


def _labelled(progress, t, shots):
    return lambda it, desc: progress(it, f"shot {t}/{shots} {desc}") if progress else it


# ----------------------------------------------------------------------------------------------
# 10. Fast paths, each the same computation as its plain version above (the tests hold them)


GRAM_BLOCKS = 4             # a symmetric sum is accumulated as 10 of its 4 x 4 blocks
LAZY_ROWS = 128             # rows whose element updates are collected before W is updated


GRAM_BLOCKS = 4             # a symmetric sum is accumulated as 10 of its 4 x 4 blocks


def add_gram(S: torch.Tensor, x: torch.Tensor, fast=True):
    """S += x^T x for x (tokens, d), the plain version where not fast. fast: the upper block
    triangle only; `mirror` completes S once at the end."""
    if not fast:
        return S.addmm_(x.T, x)
    step = -(-S.shape[0] // GRAM_BLOCKS)
    for i in range(0, S.shape[0], step):
        S[i:i + step, i:].addmm_(x[:, i:i + step].T, x[:, i:])


def mirror(S: torch.Tensor) -> torch.Tensor:
    step = -(-len(S) // GRAM_BLOCKS)
    for i in range(0, len(S), step):
        S[i + step:, i:i + step] = S[i:i + step, i + step:].T
    return S


def row_major(X_inv: torch.Tensor) -> torch.Tensor:
    """LAPACK writes a Cholesky inverse column-major; it is symmetric, so its transpose is the
    same matrix row by row (the updates gather its rows: 3.5x faster)."""
    return X_inv if X_inv.is_contiguous() else X_inv.mT


def remove_elements_lazily(W, A_inv, G_inv, mask, max_correlate):
    """remove_elements, as in SparseGPT: a block of up to LAZY_ROWS rows collects its E's, brings
    each chunk's w_Q up to date from them (through the rows A_inv[j_q], which also hold C), and
    updates W with two products at the end (with LAZY_ROWS = 1, one chunk at a time)."""
    W = W.to(G_inv.dtype).clone()
    solve = mask & (G_inv.diagonal()[:, None] > 0) & (A_inv.diagonal()[None, :] > 0)
    chunks = _row_chunks(solve.sum(1).tolist(), max_correlate)
    while chunks:
        block = [chunks.pop(0)]
        while chunks and sum(len(R) for R in block) + len(chunks[0]) <= LAZY_ROWS:
            block.append(chunks.pop(0))
        rows = torch.tensor([i for R in block for i in R], device=W.device)    # block rows
        G_B = G_inv[:, rows]                                                    # (m, |B|)
        E = W.new_zeros(len(rows), W.shape[1])                                  # (|B|, k)
        start = 0
        for R in block:
            here, start = slice(start, start + len(R)), start + len(R)
            r, j = solve[R].nonzero(as_tuple=True)                              # Q in chunk R
            i = rows[here][r]
            A_j = A_inv.index_select(0, j)                                      # (|Q|, k)
            G_ii = _submatrix(G_inv, i) if len(R) > 1 else G_inv[i[0], i[0]]    # one row: scalar
            chol, info = torch.linalg.cholesky_ex(G_ii * A_j[:, j], upper=True)  # C = chol^T chol
            if info.item():
                raise ValueError("correlated update is not positive definite; increase the damping")
            pending = G_B[R] @ E                            # (|R|, k): the block's updates so far
            w = W[i, j] - (A_j @ pending.T).gather(1, r[:, None])[:, 0]        # w_Q as updated
            E[here][r, j] = torch.cholesky_solve(w[:, None], chol, upper=True)[:, 0]  # C^-1 w_Q
        W -= G_B @ (E @ A_inv)                                                  # -G_inv E A_inv
    W[mask] = 0
    return W


def _submatrix(X, idx):
    """X[idx][:, idx], the plain version; a flat `take` is the fastest gather of it on CPU."""
    return X.reshape(-1).take(idx[:, None] * X.shape[1] + idx)


def radix_select(costs, gains, target, zeros, ranks):
    """threshold_select without a sort or a copy of ~1e9 costs: a radix select on the float32 bit
    patterns (4 passes) finds the threshold thr; everything below it is taken, then ties at thr
    in order until the target. Several processes sum the histograms and counts (exact: they
    count weights); the ties go in layer order, process after process."""
    def total(x):
        return float(ranks.sum(torch.tensor(float(x), dtype=torch.float64)))

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
        hist = ranks.sum(hist)
        byte = int((below + hist.cumsum(0) < need).sum())      # first byte that reaches need
        thr, below = (thr << 8) | byte, below + float(hist[:byte].sum())
    taken = [f | ((b < thr) & ~f) for f, b in zip(forced, bits)]
    short = need - below                                       # ties of earlier processes first
    if ranks.size > 1:
        short -= ranks.before(sum(int(gn[b == thr].sum()) for b, gn in zip(bits, gains)))
    for chosen, b, gn in zip(taken, bits, gains):              # ties at the threshold, in order
        if short <= 0:
            break
        tie = (b == thr).nonzero()[:, 0]
        take = int((gn[tie].long().cumsum(0) < short).sum()) + 1
        chosen[tie[:take]] = True
        short -= int(gn[tie[:take]].sum())
    return taken


# ----------------------------------------------------------------------------------------------
# 11. Several processes (torch.distributed, e.g. torchrun). Each process holds the model and runs
#     every calibration window; each layer is owned by one process, which alone records its
#     factors, inverts, costs and updates it. The threshold sums counts over the processes, the
#     owners send their layers' new weights to all: the single process's result, bit for bit.


def processes(layers: dict[str, nn.Linear]):
    """Ranks when torch.distributed is initialized with several processes, else OneProcess."""
    dist = torch.distributed
    several = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    return Ranks(layers) if several else OneProcess(layers)


class OneProcess:
    """One process: it owns every layer, and a sum over processes is the value itself."""
    rank, size = 0, 1

    def __init__(self, layers: dict[str, nn.Linear]):
        self.layers = layers

    def own(self, layers: dict) -> dict:
        return layers

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def concat(self, own: list[torch.Tensor], lengths: list[int]) -> torch.Tensor:
        return torch.cat(own)

    def share_weights(self):
        pass

    def together(self):
        return nullcontext()


class Ranks(OneProcess):
    """The processes of torch.distributed. Layers are owned in contiguous shares in model order,
    balanced by the factors' size (n+1)^2 + m^2. Sums over processes of counts are exact, so the
    selection, and with it every weight, is the single process's."""

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

    def concat(self, own: list[torch.Tensor], lengths: list[int]) -> torch.Tensor:
        """The vectors of all layers in model order (of these lengths), from each rank's own."""
        full, start, mine = torch.zeros(sum(lengths), dtype=own[0].dtype), 0, iter(own)
        for name, n in zip(self.layers, lengths):
            if self.owner[name] == self.rank:
                full[start:start + n] = next(mine)
            start += n
        return self.sum(full)

    def share_weights(self):
        """Every layer's weights from its owner to every rank, bit for bit."""
        for name, layer in self.layers.items():
            for p in (layer.weight, layer.bias):
                if p is not None:
                    bits = p.data.view(torch.uint8)
                    y = bits.to(self.comm)
                    torch.distributed.broadcast(y, src=self.owner[name])
                    bits.copy_(y)

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

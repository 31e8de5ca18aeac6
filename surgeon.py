"""The LLM Surgeon, in one file.

A reference implementation of van der Ouderaa, Nagel, van Baalen, Asano and Blankevoort,
"The LLM Surgeon", ICLR 2024 (arXiv 2312.17244). Read it top to bottom beside the paper; the
sections follow the order in which one shot runs:

  1. settings          4. damping, the per-layer quadratic model and its costs (Sec. 3.2-3.3)
  2. pruned layers     5. global threshold across layers (Sec. 3.4)
  3. KFAC: A and G     6. OBS updates: rows and columns, elements (Sec. 3.3, Eq. 6-8)
  (Sec. 3.1, Eq. 3)    7. interleaved low-rank updates (Sec. 3.5)    8. the multi-shot loop (Sec. 3.6)

Notation. A linear layer computes y = W x + b with W of shape (m, n). With a bias we work with the
augmented W~ = [W | b] of shape (m, n+1) and input a~ = [x; 1]; theta = vec(W~) row-major, so one
token's gradient is g (x) a~ with g = dloss/dy. The Fisher of a layer is approximated by the
Kronecker product F = G (x) A, A = E[a~ a~^T] (n+1, n+1), G = E[g g^T] (m, m).

Memory. A shot holds the model, the factors (float32, one A per input tensor that several layers
read, on `curvature_device`), one float32 cost per candidate, and the float64 workspace of one
layer at a time: its inverses are computed for the costs and again for the update.

Depends on torch only. Works on any module whose prunable layers are nn.Linear (OPT, Llama, ...),
on whatever device the model is on.
"""
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

STRUCTURES = ("unstructured", "2:4", "rowcol")
METHODS = ("surgeon", "kobd", "lobd", "magnitude")
REMOVED = -1.0              # cost of a candidate that is already removed: always taken, gains 0
LAZY_ROWS = 128             # rows whose element updates are collected before W is updated


# ----------------------------------------------------------------------------------------------
# 1. Settings


@dataclass
class Settings:
    sparsity: float = 0.5             # fraction of the pruned layers' weights that end at zero
    structure: str = "rowcol"         # "unstructured" | "2:4" | "rowcol" (whole rows and columns)
    method: str = "surgeon"           # "surgeon" | "kobd" | "lobd" | "magnitude" (Sec. 4 baselines)
    shots: int | None = None          # None: 40 for rowcol, 5 for unstructured and 2:4 (paper)
    damp_a: float = 0.01              # lambda_A, relative to the mean live diagonal of A
    damp_g: float = 0.1               # lambda_G (paper: 0.01 for rowcol; it collapses at 5% a
                                      # shot and is no better at 1.25%, see README)
    damp_costs: bool = True           # rows and columns: damped A_hat, G_hat also in the costs'
                                      # w^T A w, w^T G w (False: undamped, as the authors' code)
    max_correlate: int = 1            # most removed weights solved together in an element update:
                                      # 1 is a row at a time (authors: 2000; as good, 9x slower)
    curvature_device: str | None = None   # where A and G live; None: the model's device
    lora_steps: int = 0               # interleaved low-rank steps after each shot (0: off)
    lora_rank: int = 8
    lora_lr: float = 1e-4

    def __post_init__(self):
        if self.shots is None:
            self.shots = 40 if self.structure == "rowcol" else 5


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


GRAM_BLOCKS = 4             # a symmetric sum is accumulated as 10 of its 4 x 4 blocks


def add_gram(S: torch.Tensor, x: torch.Tensor):
    """S += x^T x for x (T, d), upper block triangle only; `mirror` completes S once at the end."""
    step = -(-S.shape[0] // GRAM_BLOCKS)
    for i in range(0, S.shape[0], step):
        S[i:i + step, i:].addmm_(x[:, i:i + step].T, x[:, i:])


def mirror(S: torch.Tensor) -> torch.Tensor:
    step = -(-len(S) // GRAM_BLOCKS)
    for i in range(0, len(S), step):
        S[i + step:, i:i + step] = S[i:i + step, i + step:].T
    return S


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

    def forward_hook(self, name):
        def hook(layer, inputs, y):
            x = inputs[0]
            if x is self.last_input:                       # q, k, v (gate, up) read one tensor
                self.source[name] = self.last_name
            else:
                self.source[name] = self.last_name = name
                self.last_input = x
                x = self.labelled(x.detach())                                   # (T, n)
                add_gram(self.xx_sum.setdefault(name, x.new_zeros(x.shape[1], x.shape[1])), x)
                self.x_sum[name] = self.x_sum.get(name, 0) + x.sum(0)
            if not y.requires_grad:                        # parameters are frozen: let the
                y.requires_grad_()                         # gradient start here
            y.register_hook(self.backward_hook(name))
            return y
        return hook

    def backward_hook(self, name):
        def hook(g):
            g = self.labelled(g)                                                # (T, m)
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


def factor_bytes(layers: dict[str, nn.Linear], source: dict | None = None) -> int:
    """float32 bytes of all factors: one G per layer, one A per distinct input, where source maps
    a layer to the layer whose input it reads (default: its own, an upper bound)."""
    source = source or {}
    A_width = {source.get(name, name): layer.in_features + (layer.bias is not None)
               for name, layer in layers.items()}
    return 4 * (sum(k * k for k in A_width.values())
                + sum(layer.out_features ** 2 for layer in layers.values()))


def kfac_factors(model: nn.Module, layers: dict[str, nn.Linear], batches, device=None,
                 progress=None):
    """A and G of every layer, averaged over the T labelled tokens. Returns {name: (A, G)} in
    float32 on `device` (default: the model's); A is (n+1, n+1) with the bias coordinate where the
    layer has a bias. Layers that read the same input tensor share one A object."""
    device = device or next(model.parameters()).device
    rec = Recorder(device)
    try:
        with frozen_with_hooks(model, {l: rec.forward_hook(n) for n, l in layers.items()}):
            for ids in (progress(batches) if progress else batches):
                rec.start_batch(ids)
                with torch.enable_grad():                                # also under no_grad
                    next_token_loss(model, ids).backward()
    except torch.OutOfMemoryError as err:
        rec.last_input = None
        need = factor_bytes(layers, rec.source) / 2**30
        raise MemoryError(f"out of memory on {device} while accumulating the curvature factors, "
                          f"which take about {need:.1f} GiB there (at most); keep them in host "
                          "memory with curvature_device='cpu' (--curvature-device cpu)") from err
    rec.last_input = None             # it holds the autograd graph, whose hooks hold rec: a cycle
    return assemble_factors(rec, layers)


def assemble_factors(rec: Recorder, layers):
    """Averages, the bias coordinate a~ = [x; 1] of A, and one A object per shared input."""
    T, A_of, factors = rec.tokens, {}, {}
    for name, layer in layers.items():
        src = rec.source[name]
        if src not in A_of:
            A = mirror(rec.xx_sum[src]).div_(T)                                 # E[x x^T]
            if layer.bias is not None:
                mean = (rec.x_sum[src] / T)[:, None]                            # E[x]
                A = torch.cat([torch.cat([A, mean], 1), torch.cat([mean.T, mean.new_ones(1, 1)], 1)])
            A_of[src] = A
        m = layer.out_features
        G = mirror(rec.gg_sum[name]).div_(T) if name in rec.gg_sum else A_of[src].new_zeros(m, m)
        factors[name] = (A_of[src], G)
    return factors


# ----------------------------------------------------------------------------------------------
# 4. The quadratic model of one layer and the costs of its candidates.
#    OBS (Sec. 3.3, Eq. 5): removing an index set Q costs 1/2 theta_Q^T [(F^-1)_QQ]^-1 theta_Q with
#    F^-1 = G_inv (x) A_inv, the damped inverses. OBD baselines (Sec. 4, "K-OBD", "L-OBD"): no
#    update follows, so the cost is the quadratic form 1/2 theta_Q^T F_QQ theta_Q of the undamped
#    F. For every method a single weight, a row and a column then cost
#        element (i, j): 1/2 g_i a_j W_ij^2      row r: 1/2 g_r w_r^T A w_r      column c: 1/2 a_c w_c^T G w_c
#    with  surgeon: A = A_hat, G = G_hat, a = 1 / diag(A_inv), g = 1 / diag(G_inv)
#                   (damp_costs=False: A, G undamped in the row and column forms, as the authors)
#          K-OBD:   A, G undamped,           a = diag(A),       g = diag(G)
#          L-OBD:   A undamped, G = I,       a = diag(A),       g = 1
#          magnitude: A = I, G = I,          a = 1,             g = 1        (None means I).
#    Dead rows (G_ii = 0, or all-zero weights) and columns (A_jj = 0, or all-zero weights) are
#    already removed (cost REMOVED); they are kept out of the inverses, and a, g are 0 there.


def damped_inverse(X: torch.Tensor, damp: float, dead: torch.Tensor, name: str = "layer"):
    """X + damp * mean(diag X_live) * I on the live coordinates and its inverse (float64,
    Cholesky); both zero on the dead coordinates (Sec. 3.2, damping). X itself is not changed."""
    live = (~dead).nonzero()[:, 0]
    everything = len(live) == len(X)
    X_live = X.to(torch.float64, copy=True) if everything else X[live][:, live].double()
    X_live.diagonal().add_(damp * X_live.diagonal().mean() if len(live) else 0.0)
    L, info = torch.linalg.cholesky_ex(X_live)
    if info != 0 or not torch.isfinite(L).all():
        raise ValueError(f"curvature of {name} is not positive definite; increase the damping "
                         f"(--damp-a / --damp-g)")
    X_inv_live = torch.cholesky_inverse(L)
    if not X_inv_live.is_contiguous():      # LAPACK writes it column-major; it is symmetric, so
        X_inv_live = X_inv_live.mT          # its transpose is the same matrix, row by row (the
                                            # updates gather its rows: 3.5x faster)
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
    """One layer's quadratic model, float64 on the layer's device: W~ (m, k), its first n_in
    columns weights and a last one the bias if any; A (k, k) or None, G (m, m) or None; a (k,),
    g (m,); A_inv, G_inv for the surgeon's update; dead rows (m,) and columns (k,)."""
    W: torch.Tensor
    n_in: int
    A: torch.Tensor | None
    G: torch.Tensor | None
    a: torch.Tensor
    g: torch.Tensor
    A_inv: torch.Tensor | None
    G_inv: torch.Tensor | None
    dead_rows: torch.Tensor
    dead_cols: torch.Tensor


def quadratic(layer: nn.Linear, A, G, s: Settings, name="layer") -> Quadratic:
    """The quadratic model of one layer under s.method, from its float32 factors (see above)."""
    W = get_matrix(layer)
    m, k = W.shape
    n_in, dev = layer.in_features, W.device
    A = None if s.method == "magnitude" else A.to(dev)
    G = G.to(dev) if s.method in ("surgeon", "kobd") else None
    dead_rows = (W == 0).all(1) | (G.diagonal() == 0 if G is not None else False)
    dead_cols = A.diagonal() == 0 if A is not None else torch.zeros(k, dtype=torch.bool, device=dev)
    dead_cols[:n_in] |= (W[:, :n_in] == 0).all(0)          # the bias column never dies of zeros
    A_inv = G_inv = None
    if s.method == "surgeon":
        A_hat, A_inv = damped_inverse(A, s.damp_a, dead_cols, name)
        G_hat, G_inv = damped_inverse(G, s.damp_g, dead_rows, name)
        a, g = 1 / A_inv.diagonal(), 1 / G_inv.diagonal()  # 1 / (F^-1)_qq per factor
        A, G = (A_hat, G_hat) if s.damp_costs else (A.double(), G.double())   # rowcol costs
        del A_hat, G_hat
    else:                                                 # OBD: the undamped factors
        A, G = (X.double() if X is not None else None for X in (A, G))
        a = A.diagonal().clone() if A is not None else torch.ones(k, dtype=W.dtype, device=dev)
        g = G.diagonal().clone() if G is not None else torch.ones(m, dtype=W.dtype, device=dev)
    a[dead_cols], g[dead_rows] = 0, 0
    return Quadratic(W, n_in, A, G, a, g, A_inv, G_inv, dead_rows, dead_cols)


def element_costs(W, a, g):
    """(m, k) costs 1/2 g_i a_j W_ij^2 of removing one weight each."""
    return W.square().mul_(a).mul_(g[:, None]).mul_(0.5)


def row_costs(W, A, g):
    """(m,) costs 1/2 g_r w_r^T A w_r of removing one whole row (with its bias)."""
    return 0.5 * g * (((W @ A) * W).sum(1) if A is not None else (W * W).sum(1))


def column_costs(W, G, a):
    """(k,) costs 1/2 a_c w_c^T G w_c of removing one whole column."""
    return 0.5 * a * (((G @ W) * W).sum(0) if G is not None else (W * W).sum(0))


PAIRS = torch.tensor([[0, 1], [0, 2], [0, 3], [1, 2], [1, 3], [2, 3]])   # the 2:4 choices


def pair_costs(W, A, a, g, method):
    """(m, n/4, 6) costs of removing each pair of 4 consecutive inputs of a row. OBD: the pair's
    quadratic form 1/2 g_i w_Q^T A_QQ w_Q, cross term included; surgeon (paper) and magnitude:
    the sum of the two element costs."""
    m, n = W.shape
    w = W.reshape(m, n // 4, 4)[..., PAIRS]                                     # (m, n/4, 6, 2)
    if method in ("kobd", "lobd"):
        groups = torch.arange(n, device=W.device).reshape(n // 4, 4)[:, PAIRS]  # (n/4, 6, 2)
        P = A[groups[..., :, None], groups[..., None, :]]                      # (n/4, 6, 2, 2)
        return 0.5 * g[:, None, None] * torch.einsum("mgpi,gpij,mgpj->mgp", w, P, w)
    return (0.5 * g[:, None, None, None] * a.reshape(n // 4, 4)[:, PAIRS] * w**2).sum(-1)


def candidates(q: Quadratic, structure: str, method: str):
    """Costs of one layer's candidates (1-D float32; REMOVED where already removed) and what each
    adds to the zeros: rowcol -> (rows then columns, the (m, n_in) nonzero pattern); unstructured
    -> (weights, 1 per nonzero weight); 2:4 -> (groups, nonzeros in the group's cheapest pair)."""
    W, n = q.W[:, :q.n_in], q.n_in
    nonzero = W != 0
    removed = ~nonzero | q.dead_rows[:, None] | q.dead_cols[None, :n]
    if structure == "rowcol":
        rows = row_costs(q.W, q.A, q.g).masked_fill(q.dead_rows, REMOVED)
        cols = column_costs(q.W, q.G, q.a)[:n].masked_fill(q.dead_cols[:n], REMOVED)
        return torch.cat([rows, cols]).float(), nonzero
    if structure == "unstructured":
        cost = element_costs(W.masked_fill(removed, 0), q.a[:n], q.g)
        return cost.masked_fill(removed, REMOVED).flatten().float(), nonzero.flatten().to(torch.uint8)
    pair = group_choice(q, method, removed)                                     # (m, n/4, 4)
    live = W.masked_fill(removed, 0).reshape(pair.shape)
    cost = pair_costs(live.reshape(W.shape), q.A, q.a[:n], q.g, method).min(-1).values
    gone = ((pair & ~removed.reshape(pair.shape)).sum(-1) == 0)
    dead = (q.dead_rows[:, None] | q.dead_cols[None, :n]).reshape(pair.shape)  # zeroed anyway
    gain = ((pair | dead) & nonzero.reshape(pair.shape)).sum(-1)
    return cost.masked_fill(gone, REMOVED).flatten().float(), gain.flatten().to(torch.uint8)


def group_choice(q: Quadratic, method: str, removed: torch.Tensor):
    """(m, n/4, 4) bool: the cheapest pair of every group of 4 consecutive inputs."""
    W = q.W[:, :q.n_in].masked_fill(removed, 0)
    best = pair_costs(W, q.A, q.a[:q.n_in], q.g, method).argmin(-1)             # (m, n/4)
    pair = torch.zeros(*best.shape, 4, dtype=torch.bool, device=W.device)
    return pair.scatter_(-1, PAIRS.to(W.device)[best], True)


# ----------------------------------------------------------------------------------------------
# 5. Global threshold (Sec. 3.4, "dynamic allocation"): pool the candidates of all layers and take
#    the cheapest until `target` of the prunable weights are zero. Zeros count whatever made
#    them: weights already zero, removed ones, and a candidate adds only the nonzero weights it
#    zeroes (a row only those not in a column taken before it, and a column likewise).


def select(costs, gains, structure, target, zeros):
    """One bool tensor per layer: the candidates taken. costs and gains as `candidates` returns
    them, target the number of zero weights wanted, zeros the number there are now."""
    if structure == "rowcol":
        return _select_rowcol(costs, gains, target, zeros)
    if structure == "2:4" and target >= 2 * sum(len(c) for c in costs):
        return [torch.ones_like(c, dtype=torch.bool) for c in costs]   # 50%: every group (Sec. 5)
    return _select_threshold(costs, gains, target, zeros)


def _select_threshold(costs, gains, target, zeros):
    """Fixed gains per candidate: the smallest cost threshold that reaches the target, found by
    a radix select on the float32 bit patterns (4 passes, no sort or copy of ~1e8 costs); ties at
    the threshold are taken in order until the target is met: exact to one candidate."""
    forced = [c == REMOVED for c in costs]
    need = target - zeros - sum(int(gn[f].sum()) for gn, f in zip(gains, forced))
    if need <= 0:
        return forced
    if sum(int(gn[~f].sum()) for gn, f in zip(gains, forced)) <= need:
        return [torch.ones_like(f) for f in forced]            # everything is not too much
    bits = [c.view(torch.int32) for c in costs]                # ordered as non-negative floats
    t, below = 0, 0.0                                          # below: gains of bits < t
    for shift in (24, 16, 8, 0):                               # one byte of t a pass
        hist = torch.zeros(256, dtype=torch.float64)
        for b, gn, f in zip(bits, gains, forced):
            same = ~f if shift == 24 else ~f & ((b >> (shift + 8)) == t)
            hist += torch.bincount((b[same] >> shift) & 255, weights=gn[same].double(),
                                   minlength=256).cpu()
        byte = int((below + hist.cumsum(0) < need).sum())      # first byte that reaches need
        t, below = (t << 8) | byte, below + float(hist[:byte].sum())
    taken = [f | ((b < t) & ~f) for f, b in zip(forced, bits)]
    short = need - below
    for chosen, b, gn in zip(taken, bits, gains):              # ties at the threshold, in order
        if short <= 0:
            break
        tie = (b == t).nonzero()[:, 0]
        k = int((gn[tie].long().cumsum(0) < short).sum()) + 1
        chosen[tie[:k]] = True
        short -= int(gn[tie[:k]].sum())
    return taken


def _select_rowcol(costs, nonzero, target, zeros):
    """Sort all rows and columns (few); each one's gain follows from the global order: a row r
    adds the nonzeros of its columns taken after it, sum_c nz[r, c] [rank c > rank r]."""
    flat = torch.cat([c.cpu() for c in costs])
    order = flat.argsort(stable=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order))
    gains, start = [], 0
    for nz in nonzero:
        m, n = nz.shape
        r, c = rank[start:start + m].to(nz.device), rank[start + m:start + m + n].to(nz.device)
        later = c[None, :] > r[:, None]                                          # (m, n)
        gains += [(nz & later).sum(1).cpu(), (nz & ~later).sum(0).cpu()]
        start += m + n
    added = torch.cat(gains)[order].cumsum(0)                 # zeros added by each prefix
    forced = int((flat == REMOVED).sum())
    k = max(forced, min(len(flat), int((zeros + added < target).sum()) + (target > zeros)))
    taken = torch.zeros(len(flat), dtype=torch.bool)
    taken[order[:k]] = True
    return [t.to(c.device) for t, c in zip(taken.split([len(c) for c in costs]), costs)]


# ----------------------------------------------------------------------------------------------
# 6. OBS updates (Sec. 3.3, Eq. 6): dtheta = -F^-1 E_Q [(F^-1)_QQ]^-1 theta_Q, F^-1 = G_inv (x) A_inv.
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


def remove_elements(W, A_inv, G_inv, mask, max_correlate):
    """Remove the weights in `mask` (m, k) with correlated OBS updates. The exact system
    C_qq' = G_inv[i_q, i_q'] A_inv[j_q, j_q'] is solved in chunks of whole rows holding at most
    max_correlate removed weights, each chunk on the weights as updated by those before it;
    everything in the mask is zeroed at the end. G = I and one row a chunk is per-row OBS.
    Chunk R's update is dW = -G_inv[:, R] M_R A_inv with M_R = C^-1 w_Q on Q (zero elsewhere).
    As in SparseGPT, updates are applied lazily: a block of up to LAZY_ROWS rows collects its
    M's, brings each chunk's w_Q up to date from them (through the rows A_inv[j_q], which also
    hold C), and updates all of W with two products at the end of the block."""
    W = W.to(G_inv.dtype).clone()
    solve = mask & (G_inv.diagonal()[:, None] > 0) & (A_inv.diagonal()[None, :] > 0)
    chunks = _row_chunks(solve.sum(1).tolist(), max_correlate)
    while chunks:
        block = [chunks.pop(0)]
        while chunks and sum(len(R) for R in block) + len(chunks[0]) <= LAZY_ROWS:
            block.append(chunks.pop(0))
        B = torch.tensor([i for R in block for i in R], device=W.device)       # block rows
        G_B = G_inv[:, B]                                                       # (m, |B|)
        M = W.new_zeros(len(B), W.shape[1])                                     # (|B|, k)
        start = 0
        for R in block:
            here, start = slice(start, start + len(R)), start + len(R)
            r, j = solve[R].nonzero(as_tuple=True)                              # Q in chunk R
            i = B[here][r]
            A_j = A_inv.index_select(0, j)                                      # (|Q|, k)
            G_ii = _submatrix(G_inv, i) if len(R) > 1 else G_inv[i[0], i[0]]    # one row: scalar
            T, info = torch.linalg.cholesky_ex(G_ii * A_j[:, j], upper=True)    # C = T^T T
            if info.item():
                raise ValueError("correlated update is not positive definite; increase the damping")
            V = G_B[R] @ M                                                      # (|R|, k)
            w = W[i, j] - (A_j @ V.T).gather(1, r[:, None])[:, 0]              # w_Q as updated
            M[here][r, j] = torch.cholesky_solve(w[:, None], T, upper=True)[:, 0]  # C^-1 w_Q
        W -= G_B @ (M @ A_inv)                                                  # -G_inv M A_inv
    W[mask] = 0
    return W


def _submatrix(X, idx):
    """X[idx][:, idx]; a flat `take` is the fastest gather of it on CPU."""
    return X.reshape(-1).take(idx[:, None] * X.shape[1] + idx)


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


def apply(q: Quadratic, taken: torch.Tensor, s: Settings) -> torch.Tensor:
    """The new W~ of one layer once its candidates `taken` are chosen. Weights that are already
    zero stay zero: they are constraints of the element update, and re-zeroed after a row and
    column update (which would otherwise move them)."""
    W, n = q.W.clone(), q.n_in
    W[q.dead_rows] = 0
    W[:, q.dead_cols] = 0
    removed = W[:, :n] == 0                                   # (m, n): zero or dead
    if s.structure == "rowcol":
        rows, cols = taken[:len(W)].nonzero()[:, 0], taken[len(W):].nonzero()[:, 0]
        if s.method == "surgeon":
            W = remove_rows_columns(W, q.A_inv, q.G_inv, rows, cols)
        W[rows], W[:, cols] = 0, 0
        W[:, :n][removed] = 0
        return W
    if s.structure == "unstructured":
        mask = taken.reshape(len(W), n) | removed
    else:
        groups = taken.reshape(len(W), n // 4, 1)
        mask = (group_choice(q, s.method, removed) & groups).reshape(len(W), n) | removed
    mask = F.pad(mask, (0, W.shape[1] - n))                    # the bias is never a candidate
    if s.method == "surgeon":                                 # OBD makes no update (Sec. 4)
        return remove_elements(W, q.A_inv, q.G_inv, mask, s.max_correlate)
    return W.masked_fill(mask, 0)


# ----------------------------------------------------------------------------------------------
# 7. Interleaved low-rank first-order updates (Sec. 3.5; off by default). Every pruned layer gets
#    W~ <- W~ + (B A^T) * M, M its keep mask at the start of the phase, B (m, r) starting at zero;
#    a few Adam steps on the calibration windows with the curvature's loss, then the product is
#    folded into the weights. The mask keeps every structure exactly: removed entries stay 0.


def low_rank_phase(model: nn.Module, layers: dict[str, nn.Linear], batches, s: Settings,
                   seed: int = 0):
    """Adds, trains and folds the adapters; `seed` makes their start reproducible."""
    gen, adapters = torch.Generator().manual_seed(seed), {}
    for name, layer in layers.items():
        W = get_matrix(layer)                                                   # (m, k)
        A = (torch.randn(W.shape[1], s.lora_rank, generator=gen) / W.shape[1]**0.5).to(W.device)
        B = torch.zeros(len(W), s.lora_rank, device=W.device)
        adapters[name] = (B.requires_grad_(), A.requires_grad_(), W != 0)         # M: bool

    def delta(B, A, M):                                                         # (B A^T) * M
        return torch.where(M, B @ A.T, 0.0)

    def adapter_output(x, B, A, M, n_in, bias):                                 # x dW^T
        dW = delta(B, A, M)
        return F.linear(x, dW[:, :n_in], dW[:, -1] if bias else None)

    def hook(name):            # dW is recomputed in the backward pass, not kept: a model's size
        def add(layer, inputs, y):
            return y + checkpoint(adapter_output, inputs[0], *adapters[name],
                                  layer.in_features, layer.bias is not None, use_reentrant=False)
        return add

    opt = torch.optim.Adam([t for B, A, _ in adapters.values() for t in (B, A)], lr=s.lora_lr)
    hooks = {layer: hook(name) for name, layer in layers.items()}
    with frozen_with_hooks(model, hooks), torch.enable_grad():
        for step in range(s.lora_steps):
            ids = batches[step % len(batches)]
            loss = next_token_loss(model, ids) / len(ids)
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        for name, layer in layers.items():
            set_matrix(layer, get_matrix(layer) + delta(*adapters[name]).double())


# ----------------------------------------------------------------------------------------------
# 8. The multi-shot loop (Sec. 3.6): shot t of T removes up to s t / T of the weights, with A and
#    G re-estimated on the partly pruned model each time.


def layer_sparsity(layers: dict[str, nn.Linear]) -> dict[str, float]:
    return {name: (weights_of(layer)[0] == 0).float().mean().item()
            for name, layer in layers.items()}


def count_zeros(layers: dict[str, nn.Linear]) -> int:
    return sum(int((weights_of(layer)[0] == 0).sum()) for layer in layers.values())


def overall_sparsity(layers: dict[str, nn.Linear]) -> float:
    return count_zeros(layers) / sum(layer.weight.numel() for layer in layers.values())


@contextmanager
def timed(seconds: dict, stage: str):
    tic = time.perf_counter()
    yield
    seconds[stage] = seconds.get(stage, 0.0) + time.perf_counter() - tic


def shot(model, layers, batches, target, s: Settings, progress, t: int = 1):
    """One shot: curvature, costs of all candidates, global threshold, updates layer by layer.
    Returns the seconds of each stage."""
    seconds = {}
    with timed(seconds, "curvature"):                                      # Sec. 3.1
        factors = {}
        if s.method != "magnitude":
            factors = kfac_factors(model, layers, progress(batches, "curvature"),
                                   s.curvature_device)
            check_finite(factors)

    def model_of(name, layer):                                             # Sec. 3.2, float64
        return quadratic(layer, *factors.get(name, (None, None)), s, name)

    with timed(seconds, "costs"):                                          # Sec. 3.3-3.4
        costs, gains = zip(*(candidates(model_of(name, layer), s.structure, s.method)
                             for name, layer in layers.items()))
        taken = select(costs, gains, s.structure, target, count_zeros(layers))
        del costs, gains
    with timed(seconds, "updates"):                                        # Sec. 3.3, Eq. 6
        for (name, layer), chosen in zip(progress(list(layers.items()), "updates"), taken):
            set_matrix(layer, apply(model_of(name, layer), chosen, s))
    del factors                              # not needed by the low-rank phase: free them first
    if s.lora_steps:                                                       # Sec. 3.5
        with timed(seconds, "lora"):
            low_rank_phase(model, layers, batches, s, seed=t)
    return seconds


def prune(model: nn.Module, batches, settings: Settings, on_shot=None, progress=None,
          first_shot: int = 1):
    """Prune `model` in place. batches: a list of (B, L) token id tensors on the model's device.
    on_shot(record) is called after each shot with that shot's record (a dict); progress(iterable,
    description) may wrap the long loops (e.g. tqdm); first_shot > 1 continues a run whose
    earlier shots are already in the model. Returns a report: overall and per-layer sparsity and
    the record of every shot."""
    s = settings
    layers = prunable_layers(model)
    batches = list(batches)
    check(s, layers, batches)
    wrap = progress or (lambda it, desc: it)
    total = sum(layer.weight.numel() for layer in layers.values())
    records = []
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")                    # no TF32 on CUDA
    try:
        for t in range(first_shot, s.shots + 1 if s.sparsity > 0 else first_shot):
            target = round(s.sparsity * total * t / s.shots)          # linear schedule
            try:
                seconds = shot(model, layers, batches, target, s,
                               lambda it, desc: wrap(it, f"shot {t}/{s.shots} {desc}"), t)
            except Exception as err:
                err.add_note(f"shot {t} of {s.shots} failed; {overall_sparsity(layers):.1%} of the "
                             "weights are zero now")
                raise
            records.append({"shot": t, "target": target / total,
                            "sparsity": overall_sparsity(layers), "seconds": seconds})
            if on_shot:
                on_shot(records[-1])
    finally:
        torch.set_float32_matmul_precision(precision)
    return {"sparsity": overall_sparsity(layers), "layers": layer_sparsity(layers),
            "shots": records}


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
    for field, low, strict in (("shots", 1, False), ("max_correlate", 1, False),
                               ("damp_a", 0, False), ("damp_g", 0, False),
                               ("lora_steps", 0, False), ("lora_rank", 1, False),
                               ("lora_lr", 0, True)):
        value = getattr(s, field)
        if not (math.isfinite(value) and (value > low if strict else value >= low)):
            raise ValueError(f"{field} must be a finite number {'>' if strict else '>='} {low}, "
                             f"got {value}")
    if s.structure == "2:4" and s.sparsity > 0.5:
        raise ValueError(f"2:4 removes at most half of the weights; sparsity {s.sparsity} "
                         "cannot be met")
    if s.curvature_device is not None:
        check_device(s.curvature_device)
    if layers is None:
        return
    if not layers:
        raise ValueError("the model has no prunable nn.Linear layers")
    odd = [name for name, layer in layers.items() if layer.in_features % 4]
    if s.structure == "2:4" and odd:
        raise ValueError(f"2:4 needs input widths divisible by 4; not so for {odd[:3]}")
    needs_data = s.method != "magnitude" or s.lora_steps > 0
    if needs_data and s.sparsity > 0 and len(batches) == 0:
        raise ValueError("calibration data is empty")


def check_device(name: str) -> torch.device:
    """A torch.device that exists here, or ValueError."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r} (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and (not torch.cuda.is_available()
                                  or (device.index or 0) >= torch.cuda.device_count()):
        raise ValueError(f"device {name!r} is not available here"
                         + ("" if torch.cuda.is_available() else " (no CUDA)"))
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device {name!r} is not supported (cpu or cuda)")
    return device


def check_finite(factors):
    for name, (A, G) in factors.items():
        for X, what in ((A, "A (inputs)"), (G, "G (output gradients)")):
            if not torch.isfinite(X).all():
                raise ValueError(f"non-finite curvature {what} in layer {name}: check the model "
                                 "and data (float32?), or increase the damping")

"""Heads and MLP units: a structure for surgeon.py that removes what a model can lose whole.

Not in the paper; from its framework. A unit is a set of lines (rows or columns) spread over
several layers: an MLP unit j is row j of gate_proj and up_proj and column j of down_proj (OPT:
row j of fc1 with its bias, column j of fc2); an attention head h is its head_dim rows of q_proj
(and of k_proj and v_proj where it owns them) and its head_dim columns of o_proj. Zeroing one
*cut* of a unit silences it, after which its other lines do nothing: an MLP unit is cut by its
gate row, its up row or its down column (the activated row only where act(0) = 0); a head by its
o_proj columns, or by its v rows where it owns them. Under KFAC the layers are independent, so

  - a unit costs its cheapest cut, each the exact joint OBS cost of the cut's lines in its one
    layer (Sec. 3.3, Eq. 5 for a block of lines): rows R 1/2 tr((G_inv_RR)^-1 W~_R A W~_R^T),
    columns C 1/2 tr((A_inv_CC)^-1 W~_C^T G W~_C), the forms as rows and columns use them (with
    cost "lines": the sum of the costs of all its lines);
  - its gain is every nonzero weight of all its lines;
  - its update is the cut layer's rows-or-columns OBS update (Eq. 6), then its other lines zeroed.

Grouped-query attention: a query head is cut by its o_proj columns alone; a key-value head's k
and v rows are dead lines once every query head that reads them is gone.

    structure = units.Units(units.find(model), surgeon.prunable_layers(model))
    surgeon.prune(model, batches, Settings(structure="units"), structure=structure)
    units.prune(model, batches, Settings(structure="units"))     # the same, with scale.prune
"""
import itertools
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

import surgeon
from surgeon import REMOVED, Quadratic, Settings

ORDERS = ("cost", "per-weight")     # units taken in order of cost, or of cost per weight removed


@dataclass
class UnitGroup:
    """Units of one kind in one block, e.g. its MLP units or its attention heads. Unit u owns, in
    each of `lines` (layer name, "rows" or "cols", width w), the indices u*w .. u*w + w - 1;
    zeroing one of its `cuts` (indices into `lines`) silences it alone. A `shared` line (layer
    name, axis, width, k) belongs to k consecutive units together and is dead once all of them
    are gone (grouped-query k, v)."""
    count: int
    lines: list[tuple[str, str, int]]
    cuts: list[int]
    shared: list[tuple[str, str, int, int]] = field(default_factory=list)


@dataclass
class Part:
    """The lines of one group in one layer: index into the group's lines (share None) or shared
    lines (share k: one block of `width` lines a k units), and `priced`, the column of its cost
    in the group's table, None where its cost does not count."""
    group: int
    axis: str
    width: int
    index: int
    share: int | None
    priced: int | None


@dataclass
class UnitCandidates:
    """One layer's share of the units: cost (c,) of each priced part's blocks, one part after the
    other, then nonzero (l,), the nonzero weights of each block of every part."""
    name: str
    cost: torch.Tensor
    nonzero: torch.Tensor


def block_costs(W, form, P, width):
    """(m / width,) costs 1/2 tr(P_b W_b form W_b^T) of removing the row blocks W_b (width rows
    each) of W: OBS for rows R with P_b = (G_inv_RR)^-1 and form A (Eq. 5), or the OBD form with
    P_b = G_RR. Columns: the same on W^T with the A side's P_b and form G."""
    M = W @ form if form is not None else W
    S = M.reshape(-1, width, W.shape[1]) @ W.reshape(-1, width, W.shape[1]).mT      # (b, w, w)
    return 0.5 * (P * S).sum((1, 2))


def block_precisions(X_inv, X, precision, width, method):
    """(b, w, w) precisions of consecutive blocks of one side's coordinates: surgeon
    (X_inv_bb)^-1, K-OBD and L-OBD the undamped X_bb, else I; zero on dead coordinates (where
    precision, the single coordinates' alpha or gamma, is 0)."""
    live = (precision != 0).reshape(-1, width).to(precision.dtype)               # (b, w)
    idx = torch.arange(len(precision), device=precision.device).reshape(-1, width)
    if method == "surgeon":
        P = torch.linalg.inv(X_inv[idx[:, :, None], idx[:, None, :]] + torch.diag_embed(1 - live))
    elif X is not None:
        P = X[idx[:, :, None], idx[:, None, :]]
    else:
        P = torch.diag_embed(torch.ones_like(live))
    return P * live[:, :, None] * live[:, None, :]


class Units:
    """A candidate is a unit a model can lose whole (the module docstring). `groups` from `find`
    (or written for an architecture it does not know), `layers` the model's prunable layers in
    model order; cost "cut" (a unit's cheapest cut) or "lines" (the sum of its lines' costs);
    order "per-weight" (units taken in order of cost per weight removed; a head can hold 40 MLP
    units' weights) or "cost" (in order of cost).

    The target counts what compaction removes: the weights of removed units (every line zero)
    and of shared lines all of whose units are removed. Scattered zeros elsewhere (a checkpoint
    dequantized from 4 bits has thousands) neither count toward it nor stop it."""
    name = "units"

    def __init__(self, groups: list[UnitGroup], layers: dict[str, nn.Linear], cost: str = "cut",
                 order: str = "per-weight"):
        if cost not in ("cut", "lines"):
            raise ValueError(f"unit_cost must be 'cut' or 'lines', got {cost!r}")
        if order not in ORDERS:
            raise ValueError(f"unit_order must be one of {ORDERS}, got {order!r}")
        check(groups, layers)
        self.groups, self.summed, self.layer_order = groups, cost == "lines", list(layers)
        self.per_weight = order == "per-weight"
        self.priced = [list(range(len(group.lines))) if self.summed else group.cuts
                       for group in groups]                  # the lines whose costs count
        self.parts = {}                                      # layer name -> [Part]
        for g, group in enumerate(groups):
            for i, (layer, axis, width) in enumerate(group.lines):
                priced = self.priced[g].index(i) if i in self.priced[g] else None
                self.parts.setdefault(layer, []).append(Part(g, axis, width, i, None, priced))
            for j, (layer, axis, width, k) in enumerate(group.shared):
                self.parts.setdefault(layer, []).append(Part(g, axis, width, j, k, None))
        self.starts = list(itertools.accumulate((group.count for group in groups), initial=0))
        weights = {name: (layer.out_features, layer.in_features) for name, layer in layers.items()}

        def block(layer, axis, width):                  # weights in `width` lines of a layer
            return width * weights[layer][1 if axis == "rows" else 0]
        self.size = torch.cat([torch.full((group.count,), sum(block(*line) for line in group.lines))
                               for group in groups])    # (units,): the weights of its own lines
        self.shared_size = {(g, j): block(*line[:3]) for g, group in enumerate(groups)
                            for j, line in enumerate(group.shared)}

    def candidates(self, quad: Quadratic, cfg: Settings) -> UnitCandidates:
        A, G = quad.forms()
        n = quad.n_in
        W = quad.W.masked_fill(F.pad(quad.removed, (0, quad.W.shape[1] - n)), 0)
        costs, counts = [], []
        for part in self.parts.get(quad.name, ()):
            counts.append(nonzeros(W, n, part))
            if part.priced is not None and part.axis == "rows":
                P = block_precisions(quad.G_inv, quad.G, quad.gamma, part.width, cfg.method)
                costs.append(block_costs(W, A, P, part.width))
            elif part.priced is not None:                                        # no bias
                P = block_precisions(quad.A_inv, quad.A, quad.alpha[:n], part.width, cfg.method)
                costs.append(block_costs(W[:, :n].T, G, P, part.width))
        return UnitCandidates(quad.name,
                              torch.cat(costs).float() if costs else W.new_zeros(0).float(),
                              torch.cat(counts) if counts else W.new_zeros(0, dtype=torch.long))

    def select(self, cands: list[UnitCandidates], target: int, zeros: int, rt):
        """Every unit's cost, cut and gain from all layers' shares (several processes gather
        them); then, as for rows and columns, the shortest prefix in order (of cost, or of cost
        per weight) whose removed weights reach the target, a shared line's weights counted with
        the last of its units. `zeros` (every zero of the layers) is not used: the target counts
        removed units alone (the class docstring)."""
        cost, count = (rt.gather([getattr(c, what).cpu() for c in cands])[0]
                       for what in ("cost", "nonzero"))
        line_cost, own, shared = self.tables(cost, count)
        cut_cost = [c[:, [priced.index(i) for i in group.cuts]]
                    for c, priced, group in zip(line_cost, self.priced, self.groups)]
        unit_cost = torch.cat([c.sum(1) for c in line_cost] if self.summed else
                              [c.min(1).values for c in cut_cost])
        removed = torch.cat(own) == 0                        # every line zero: always taken
        key = unit_cost / self.size if self.per_weight else unit_cost
        key[removed] = REMOVED
        order = key.argsort(stable=True)
        position, gain = surgeon.positions(order), self.size.masked_fill(removed, 0)
        bonus = torch.zeros_like(gain)
        for (g, j), blocks in shared.items():                # a shared block's weights: with
            k, start = self.groups[g].shared[j][3], self.starts[g]   # the last of its units
            units = removed[start:self.starts[g + 1]].reshape(-1, k)
            last = position[start:self.starts[g + 1]].reshape(-1, k).argmax(1)
            bonus[start + torch.arange(len(blocks)) * k + last] += \
                self.shared_size[g, j] * ~units.all(1)
        taken = surgeon.shortest_prefix(key, order, (gain + bonus)[order].cumsum(0), target,
                                        self.weights_of(removed))
        choice = torch.cat([c.argmin(1) for c in cut_cost])  # the cheapest cut of each unit
        return [self.to_remove(c.name, taken, choice) for c in cands]

    def tables(self, cost, count):
        """From the gathered vectors of all layers: per group its (units, priced lines) costs and
        own nonzeros (units,); per shared line (group, index) the nonzeros of its blocks."""
        line_cost = [torch.empty(gr.count, len(p)) for gr, p in zip(self.groups, self.priced)]
        own = [torch.zeros(gr.count, dtype=torch.long) for gr in self.groups]
        shared, at_cost, at_count = {}, 0, 0
        for name in self.layer_order:
            for part in self.parts.get(name, ()):
                units = self.groups[part.group].count
                if part.priced is not None:
                    line_cost[part.group][:, part.priced] = cost[at_cost:at_cost + units]
                    at_cost += units
                n = units // (part.share or 1)
                if part.share is None:
                    own[part.group] += count[at_count:at_count + n]
                else:
                    shared[part.group, part.index] = count[at_count:at_count + n]
                at_count += n
        return line_cost, own, shared

    def weights_of(self, removed) -> int:
        """The weights compaction removes with these units ((units,) bool): theirs, and those of
        the shared lines all of whose units are among them."""
        total = int(self.size[removed].sum())
        for (g, j), size in self.shared_size.items():
            units = removed[self.starts[g]:self.starts[g + 1]]
            total += size * int(units.reshape(-1, self.groups[g].shared[j][3]).all(1).sum())
        return total

    def removed_weights(self, layers: dict[str, nn.Linear]) -> int:
        """What compaction removes now: weights_of the units whose lines are all zero."""
        own = [torch.zeros(group.count, dtype=torch.long) for group in self.groups]
        for name, parts in self.parts.items():
            W = surgeon.get_matrix(layers[name])
            for part in (p for p in parts if p.share is None):
                own[part.group] += nonzeros(W, layers[name].in_features, part).cpu()
        return self.weights_of(torch.cat(own) == 0)

    def to_remove(self, name, taken, choice):
        """A layer's lines to remove: {(axis, "cut" or "dead"): indices}."""
        remove = {}
        for part in self.parts.get(name, ()):
            group, start = self.groups[part.group], self.starts[part.group]
            units = taken[start:start + group.count]
            if part.share is None:
                cut = choice[start:start + group.count] == group.cuts.index(part.index) \
                    if part.index in group.cuts else torch.zeros_like(units)
                kinds = (("cut", units & cut), ("dead", units & ~cut))
            else:
                kinds = (("dead", units.reshape(-1, part.share).all(1)),)
            for kind, blocks in kinds:
                idx = (blocks.nonzero()[:, :1] * part.width + torch.arange(part.width)).flatten()
                remove[part.axis, kind] = torch.cat([remove.get((part.axis, kind), idx[:0]), idx])
        return remove

    def update(self, quad: Quadratic, taken: dict, cand: UnitCandidates, cfg: Settings, rt):
        """The cut lines by the rows-and-columns update, then the dead ones zeroed."""
        def index(axis, kind):
            return taken.get((axis, kind), torch.zeros(0, dtype=torch.long)).to(quad.W.device)
        W = surgeon.remove_lines(quad, index("rows", "cut"), index("cols", "cut"), cfg)
        W[index("rows", "dead")] = 0
        W[:, index("cols", "dead")] = 0
        return W


def nonzeros(W, n_in, part: Part):
    """(blocks,) the nonzero entries of W~ (bias included) in each block of the part's lines."""
    X = W if part.axis == "rows" else W[:, :n_in].T                      # its lines as rows
    return (X != 0).reshape(-1, part.width * X.shape[1]).sum(1)


def check(groups: list[UnitGroup], layers: dict[str, nn.Linear]):
    """Units need their groups; every line must fit its layer."""
    if not groups:
        raise ValueError("structure 'units' found no heads or MLP units in the model's blocks "
                         "(units.find knows q/k/v_proj with o_proj, out_proj or dense; fc1 and "
                         "fc2; gate/up/down_proj)")
    for group in groups:
        for name, axis, width, *shared in (*group.lines, *group.shared):
            layer = layers.get(name)
            n = group.count // (shared[0] if shared else 1) * width
            size = layer and (layer.out_features if axis == "rows" else layer.in_features)
            if layer is None or axis not in ("rows", "cols") or n != size:
                raise ValueError(f"unit lines ({name}, {axis}, {width}) x {n // width} do not "
                                 f"match a prunable layer's {axis} ({size})")


# ----------------------------------------------------------------------------------------------
# A model's units: what an MLP and an attention block are, by the names of their layers


def kind_of(module: nn.Module) -> str | None:
    """'ungated' (OPT's MLP), 'gated' (Llama's), 'attention', or None."""
    for kind, names in (("ungated", ("fc1", "fc2", "activation_fn")),
                        ("gated", ("gate_proj", "up_proj", "down_proj", "act_fn")),
                        ("attention", ("q_proj", "k_proj", "v_proj", "head_dim"))):
        if all(hasattr(module, n) for n in names):
            return kind
    return None


def output_of(attention: nn.Module) -> nn.Linear:
    """The output projection of an attention block: o_proj (Llama), out_proj (OPT), dense (Phi)."""
    return next(getattr(attention, n) for n in ("o_proj", "out_proj", "dense")
                if hasattr(attention, n))


def mlp_of(module: nn.Module, kind: str):
    """(up layers, the activated one first; down layer; activation) of an MLP of this kind."""
    if kind == "ungated":
        return [module.fc1], module.fc2, module.activation_fn
    return [module.gate_proj, module.up_proj], module.down_proj, module.act_fn


def silent_at_zero(act) -> bool:
    return bool(act(torch.zeros(1)) == 0)


def find(model: nn.Module) -> list[UnitGroup]:
    """The heads and MLP units of every block: an MLP unit is cut by its gate row, its up row or
    its down column (OPT: its fc1 row with the bias, or its fc2 column), where act(0) = 0 for the
    rows; a head by its o_proj columns, or by its v rows where it owns them. Grouped-query k and
    v rows are shared by their query heads."""
    names = {module: name for name, module in model.named_modules()}
    groups = []
    for module in model.modules():
        kind = kind_of(module)
        if kind in ("ungated", "gated"):
            up, down, act = mlp_of(module, kind)
            lines = [(names[layer], "rows", 1) for layer in up] + [(names[down], "cols", 1)]
            first = 0 if silent_at_zero(act) else 1      # the activated row (gate, fc1): a cut
            groups.append(UnitGroup(up[0].out_features, lines,   # only where act(0) = 0
                                    list(range(first, len(lines)))))
        elif kind == "attention":
            q, k, v = (names[getattr(module, n)] for n in ("q_proj", "k_proj", "v_proj"))
            o = names[output_of(module)]
            d = module.head_dim
            heads, kv = module.q_proj.out_features // d, module.k_proj.out_features // d
            if kv == heads:
                groups.append(UnitGroup(heads, [(q, "rows", d), (k, "rows", d), (v, "rows", d),
                                                (o, "cols", d)], [3, 2]))
            else:
                groups.append(UnitGroup(heads, [(q, "rows", d), (o, "cols", d)], [1],
                                        [(k, "rows", d, heads // kv), (v, "rows", d, heads // kv)]))
    return groups


def structure(model: nn.Module, cost: str = "cut", order: str = "per-weight") -> Units:
    """The units structure of a model, its units found by `find`."""
    return Units(find(model), surgeon.prunable_layers(model), cost, order)


def prune(model: nn.Module, batches, settings: Settings, cost: str = "cut",
          order: str = "per-weight", **kwargs):
    """scale.prune (checked, fast, over processes) with the model's units; settings.structure
    must be "units" (its schedule and low-rank defaults are rows and columns')."""
    import scale                     # here only: Units itself needs no more than surgeon.py
    if settings.structure != "units":
        raise ValueError(f"units.prune prunes structure 'units', got {settings.structure!r}")
    return scale.prune(model, batches, settings, structure=structure(model, cost, order), **kwargs)

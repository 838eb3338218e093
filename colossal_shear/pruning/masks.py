"""Hard-concrete masks over one decoder config (any supported family), their expected shape / size, and exact
binarisation.

Mask kinds (`KINDS`), each a tensor of gates in [0, 1]:
  'hidden'       [d]      hidden channels (the residual stream; shared by every layer, the embeddings and the head)
  'layer'        [L]      whole decoder layers (0 = the block becomes the identity)
  'group'        [L, KV]  whole KV groups (a KV head with all the query heads that read it)
  'head'         [L, H]   query heads; a query head's effective gate is head z * the z of its group
  'intermediate' [L, F]   MLP neurons
Only the kinds the target actually shrinks get learnable gates; the others are constant ones (no parameters, no
noise), so every dict returned here always has all five keys.
"""

from __future__ import annotations

import torch
from torch import nn

from colossal_shear.models.registry import adapter_for
from colossal_shear.pruning.hard_concrete import HardConcrete
from colossal_shear.pruning.shape import PruneError, PruneShape, head_dim_of

KINDS = ("hidden", "layer", "group", "head", "intermediate")
SHAPE_KEYS = ("hidden", "layers", "heads", "kv_heads", "intermediate")


def kind_shapes(source: PruneShape) -> dict[str, tuple]:
    return {
        "hidden": (source.hidden,),
        "layer": (source.layers,),
        "group": (source.layers, source.kv_heads),
        "head": (source.layers, source.heads),
        "intermediate": (source.layers, source.intermediate),
    }


def pruned_kinds(source: PruneShape, target: PruneShape) -> list[str]:
    """The mask kinds a target shrinks (query heads only when it keeps fewer heads per KV group)."""
    out = []
    if target.hidden < source.hidden:
        out.append("hidden")
    if target.layers < source.layers:
        out.append("layer")
    if target.kv_heads < source.kv_heads:
        out.append("group")
    if target.heads // target.kv_heads < source.heads // source.kv_heads:
        out.append("head")
    if target.intermediate < source.intermediate:
        out.append("intermediate")
    return out


def effective_heads(z: dict, source: PruneShape) -> torch.Tensor | None:
    """[L, H] effective query-head gates: head z times the z of the head's KV group (None when neither is given)."""
    head, group = z.get("head"), z.get("group")
    if head is None and group is None:
        return None
    ratio = source.heads // source.kv_heads
    g = group.repeat_interleave(ratio, dim=-1) if group is not None else None
    if head is None:
        return g
    return head * g if g is not None else head


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the k highest scores along the last dim (ties: the lower index wins)."""
    order = torch.argsort(scores.float(), dim=-1, descending=True, stable=True)[..., :k]
    keep = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    return keep.scatter_(-1, order, True)


def _top_layers(scores: torch.Tensor, k: int, pattern: tuple[list[str], list[str]] | None) -> torch.Tensor:
    """The k highest-scoring layers; with a layer-type `pattern` (source types, target types), the highest total
    score among the choices whose i-th kept layer has the target's i-th type (dynamic programming over layers)."""
    if pattern is None:
        return _top(scores, k)
    source_types, target_types = pattern
    s = scores.detach().double().cpu().tolist()
    n, neg = len(source_types), float("-inf")
    best = [[0.0] * (n + 1)] + [[neg] * (n + 1) for _ in target_types]  # best[j][i]: j kept among the first i
    for j, wanted in enumerate(target_types, 1):
        for i in range(1, n + 1):
            take = best[j - 1][i - 1] + s[i - 1] if source_types[i - 1] == wanted else neg
            best[j][i] = max(best[j][i - 1], take)
    if best[k][n] == neg:
        raise PruneError(f"no {k} of the layers {source_types} keep the layer types {target_types}")
    keep, i = torch.zeros(n, dtype=torch.bool, device=scores.device), n
    for j in range(k, 0, -1):
        while best[j][i] == best[j][i - 1]:  # layer i-1 not needed for this optimum
            i -= 1
        keep[i - 1] = True
        i -= 1
    return keep


def select(
    source: PruneShape,
    target: PruneShape,
    scores: dict,
    values: dict | None = None,
    device: torch.device | str | None = None,
    layer_pattern: tuple[list[str], list[str]] | None = None,
) -> dict:
    """Masks with exactly the target counts, chosen by `scores` (higher = keep).

    Keeps the top `layers` layers; in every layer the top `kv_heads` groups, then the top heads // kv_heads query
    heads inside each kept group (the same number per group: a valid GQA layout); the top `intermediate` neurons per
    layer; the top `hidden` channels. With a `layer_pattern` (`FamilyAdapter.layer_pattern`: alternating sliding /
    global layers), the kept layers keep their types at their new positions. `scores[kind]` is needed only for the
    kinds the target shrinks. Kept entries get
    `values[kind]` (default 1.0), pruned ones 0. Returns fp32 tensors for all five kinds.
    """
    target.validate_against(source)
    values = values or {}
    shapes = kind_shapes(source)
    if device is None:
        device = next((v.device for v in scores.values() if v is not None), torch.device("cpu"))
    keep: dict[str, torch.Tensor] = {}

    def need(kind):
        s = scores.get(kind)
        if s is None:
            raise ValueError(f"scores for {kind!r} are needed to prune it")
        if tuple(s.shape) != shapes[kind]:
            raise ValueError(f"scores for {kind!r} have shape {tuple(s.shape)}, expected {shapes[kind]}")
        return s.to(device)

    all_ = lambda kind: torch.ones(shapes[kind], dtype=torch.bool, device=device)  # noqa: E731
    keep["hidden"] = _top(need("hidden"), target.hidden) if target.hidden < source.hidden else all_("hidden")
    keep["layer"] = (
        _top_layers(need("layer"), target.layers, layer_pattern) if target.layers < source.layers else all_("layer")
    )
    keep["group"] = _top(need("group"), target.kv_heads) if target.kv_heads < source.kv_heads else all_("group")
    ratio, t_ratio = source.heads // source.kv_heads, target.heads // target.kv_heads
    if t_ratio < ratio:
        per_group = need("head").view(source.layers, source.kv_heads, ratio)
        heads = _top(per_group, t_ratio)
    else:
        heads = torch.ones(source.layers, source.kv_heads, ratio, dtype=torch.bool, device=device)
    keep["head"] = (heads & keep["group"][..., None]).view(source.layers, source.heads)
    keep["intermediate"] = (
        _top(need("intermediate"), target.intermediate)
        if target.intermediate < source.intermediate
        else all_("intermediate")
    )
    out = {}
    for kind, k in keep.items():
        v = values.get(kind)
        v = torch.ones(k.shape, device=device) if v is None else v.detach().float().to(device)
        out[kind] = torch.where(k, v, torch.zeros((), device=device))
    return out


class PruningMasks(nn.Module):
    """Masks for one decoder config: 'hidden' [d], 'layer' [L], 'group' [L, KV] (whole KV groups), 'head' [L, H] (query
    heads), 'intermediate' [L, F]. Learnable (hard-concrete) only for the kinds `target` shrinks."""

    def __init__(
        self,
        config,
        target: PruneShape,
        init_log_alpha: float = 5.0,
        init_std: float = 0.01,
        seed: int = 0,
        min_kept_value: float = 1e-3,
    ):
        super().__init__()
        self.source = PruneShape.from_config(config)
        self.target = target
        target.validate_against(self.source)
        self.head_dim = head_dim_of(config)
        self.vocab_size = int(config.vocab_size)
        self.tied = bool(getattr(config, "tie_word_embeddings", False))
        self.min_kept_value = float(min_kept_value)
        self.pruned = pruned_kinds(self.source, target)
        self.layer_pattern = adapter_for(config).layer_pattern(target.layers)
        g = torch.Generator().manual_seed(seed)  # the same initial log_alpha on every rank
        shapes = kind_shapes(self.source)
        self.gates = nn.ModuleDict(
            {k: HardConcrete(shapes[k], init_log_alpha, init_std, generator=g) for k in self.pruned}
        )
        self.register_buffer("_anchor", torch.zeros(0), persistent=False)  # follows .to(device)

    @property
    def device(self) -> torch.device:
        return self._anchor.device

    def extra_repr(self) -> str:
        return f"source=({self.source.describe()}), target=({self.target.describe()})"

    def _each(self, fn) -> dict[str, torch.Tensor]:
        shapes = kind_shapes(self.source)
        return {k: fn(self.gates[k]) if k in self.gates else torch.ones(shapes[k], device=self.device) for k in KINDS}

    def constrain(self) -> None:
        """Clamp every gate's log_alpha to the reference's range (the prune stage calls it before every forward)."""
        for gate in self.gates.values():
            gate.constrain()

    # ------------------------------------------------------------------ gates
    def sample(self, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Stochastic gates for a training step (all five kinds; constant ones for the kinds not pruned)."""
        return self._each(lambda m: m.sample(generator))

    def deterministic(self) -> dict[str, torch.Tensor]:
        return self._each(lambda m: m.deterministic())

    def keep_probs(self) -> dict[str, torch.Tensor]:
        return self._each(lambda m: m.keep_prob())

    def forward(self, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        return self.sample(generator) if self.training else self.deterministic()

    # ------------------------------------------------------------------ expected shape / size
    def expected_shape(self) -> dict[str, torch.Tensor]:
        """Differentiable expected kept counts (from P(z > 0)): 'hidden' and 'layers' totals; 'heads' (query heads,
        including the effect of their group), 'kv_heads' and 'intermediate' as means over the source's layers."""
        p = self.keep_probs()
        heads = effective_heads(p, self.source)
        return {
            "hidden": p["hidden"].sum(),
            "layers": p["layer"].sum(),
            "heads": heads.sum(-1).mean(),
            "kv_heads": p["group"].sum(-1).mean(),
            "intermediate": p["intermediate"].sum(-1).mean(),
        }

    def expected_per_layer(self) -> dict[str, torch.Tensor]:
        """Like `expected_shape`, but 'heads', 'kv_heads' and 'intermediate' are [L] vectors (one expected count per
        source layer): the projection puts every layer on the target (constraint.py)."""
        p = self.keep_probs()
        return {
            "hidden": p["hidden"].sum(),
            "layers": p["layer"].sum(),
            "heads": effective_heads(p, self.source).sum(-1),
            "kv_heads": p["group"].sum(-1),
            "intermediate": p["intermediate"].sum(-1),
        }

    def target_shape(self) -> dict[str, float]:
        return _sizes(self.target)

    def source_shape(self) -> dict[str, float]:
        return _sizes(self.source)

    def expected_params(self) -> torch.Tensor:
        """Expected parameter count: embedding (and untied LM head) rows x the expected hidden size; per layer
        (scaled by its layer score) attention = d_hat * head_dim * 2 * (heads_hat + kv_hat), MLP = 3 * d_hat *
        neurons_hat, two norms; plus the final norm. Biases are not counted."""
        p = self.keep_probs()
        d = p["hidden"].sum()
        heads = effective_heads(p, self.source).sum(-1)  # [L]
        kv = p["group"].sum(-1)
        neurons = p["intermediate"].sum(-1)
        per_layer = d * self.head_dim * 2 * (heads + kv) + 3 * d * neurons + 2 * d
        emb = self.vocab_size * d * (1 if self.tied else 2)
        return emb + d + (p["layer"] * per_layer).sum()

    # ------------------------------------------------------------------ final masks
    @torch.no_grad()
    def binarize(self) -> dict[str, torch.Tensor]:
        """Exact target counts, chosen by log_alpha: kept layers / groups / heads / neurons carry their deterministic
        z (folded into the weights as a scale; floored at `min_kept_value` so that a kept unit is never 0), pruned
        ones 0; kept hidden channels are exactly 1.0 (a scale on hidden channels cannot be folded into a tied
        embedding / LM-head matrix)."""
        scores = {k: self.gates[k].log_alpha.detach().float() for k in self.pruned}
        det = self.deterministic()
        values = {k: det[k].clamp(min=self.min_kept_value) for k in ("layer", "group", "head", "intermediate")}
        return select(self.source, self.target, scores, values, self.device, self.layer_pattern)

    @torch.no_grad()
    def dropped_share(self) -> dict[str, float]:
        """Per learnable kind, the share of the deterministic gates' sum that `binarize()` would set to 0: how much
        of what the masked model still uses the fold removes (0: the fold removes only gates already off)."""
        det, kept = self.deterministic(), self.binarize()
        out = {}
        for kind in self.pruned:
            total = float(det[kind].sum())
            out[kind] = float(det[kind][kept[kind] == 0].sum()) / total if total > 0 else 0.0
        return out


def _sizes(shape: PruneShape) -> dict[str, float]:
    """A shape's size per pruned dimension, keyed like `expected_shape`."""
    names = ("hidden", "layers", "heads", "kv_heads", "intermediate")
    return {name: float(getattr(shape, name)) for name in names}

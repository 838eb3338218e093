"""Dynamic batch loading (Sheared-LLaMA, after DoReMi): per-category sampling weights that move towards the
categories whose loss is furthest above its reference, and a sampler that draws each sequence's category by them.

Update after each evaluation: w' = softmax(ln w + eta * (L - L_ref)); w = (1 - c) w' + c / k  (eta = 1, c = 1e-4).
"""

from __future__ import annotations

import torch


def parse_reference_losses(text: str) -> dict[str, float]:
    """'en=2.1,zh=3.05' -> {'en': 2.1, 'zh': 3.05}, with a clear error for anything else."""
    out = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, sep, value = item.partition("=")
        try:
            if not sep or not name.strip():
                raise ValueError
            out[name.strip()] = float(value)
        except ValueError:
            raise ValueError(f"--reference_loss: {item!r} is not category=value") from None
    if not out:
        raise ValueError("--reference_loss: no category=value pairs")
    return out


class DomainWeights:
    def __init__(
        self,
        categories: list[str],
        initial: list[float],
        reference: dict[str, float],
        eta: float = 1.0,
        smoothing: float = 1e-4,
    ):
        missing = [c for c in categories if c not in reference]
        extra = [c for c in reference if c not in categories]
        if missing or extra:
            raise ValueError(
                f"reference losses must name exactly the dataset's categories {categories}: "
                f"missing {missing}, unknown {extra}"
            )
        self.categories = list(categories)
        w = torch.tensor(initial, dtype=torch.float64)
        self.weights = w / w.sum()
        self.reference = torch.tensor([reference[c] for c in categories], dtype=torch.float64)
        self.eta, self.smoothing = eta, smoothing

    def update(self, losses: dict[str, float]) -> torch.Tensor:
        current = torch.tensor([losses[c] for c in self.categories], dtype=torch.float64)
        logits = torch.log(self.weights) + self.eta * (current - self.reference)
        new = torch.softmax(logits, dim=0)
        k = len(self.categories)
        self.weights = (1 - self.smoothing) * new + self.smoothing / k
        return self.weights

    def as_dict(self) -> dict[str, float]:
        return {c: float(w) for c, w in zip(self.categories, self.weights)}

    def state_dict(self) -> dict:
        return {"categories": self.categories, "weights": self.weights.clone(), "reference": self.reference.clone()}

    def load_state_dict(self, state: dict) -> None:
        if list(state["categories"]) != self.categories:
            raise ValueError(f"checkpoint domain weights are for {state['categories']}, data has {self.categories}")
        self.weights, self.reference = state["weights"].clone(), state["reference"].clone()


class DomainSampler:
    """Draws each sequence's category by the current weights, then the next sequence of that category.

    Each category's sequences are split across data-parallel ranks (rank r takes every dp_size-th) and reshuffled
    per pass; the category draws use a generator whose state is checkpointed, so resume is exact.
    """

    def __init__(
        self, sequence_categories: list[str], weights: DomainWeights, dp_rank: int = 0, dp_size: int = 1, seed: int = 42
    ):
        self.weights = weights
        self.seed, self.dp_rank = seed, dp_rank
        self.pools = []
        for c in weights.categories:
            idx = [i for i, s in enumerate(sequence_categories) if s == c]
            mine = idx[dp_rank::dp_size] or idx  # a category too small to split: every rank reuses it whole
            if not mine:
                raise ValueError(f"category {c!r} has no sequences")
            self.pools.append(torch.tensor(mine))
        self.passes = [0] * len(self.pools)
        self.positions = [0] * len(self.pools)
        self.generator = torch.Generator().manual_seed(seed * 7919 + dp_rank)
        self._cache = {}

    def _order(self, k: int) -> torch.Tensor:
        key = (k, self.passes[k])
        if self._cache.get(k, (None,))[0] != key:  # one shuffle per pass of a category, derived from the seed
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + 101 * k + self.passes[k])
            self._cache[k] = (key, self.pools[k][torch.randperm(len(self.pools[k]), generator=g)])
        return self._cache[k][1]

    def take(self, n: int) -> list[int]:
        draws = torch.multinomial(self.weights.weights.float(), n, replacement=True, generator=self.generator)
        out = []
        for k in draws.tolist():
            out.append(int(self._order(k)[self.positions[k]]))
            self.positions[k] += 1
            if self.positions[k] == len(self.pools[k]):
                self.positions[k], self.passes[k] = 0, self.passes[k] + 1
        return out

    def state_dict(self) -> dict:
        return {
            "generator": self.generator.get_state(),
            "passes": list(self.passes),
            "positions": list(self.positions),
            "weights": self.weights.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.passes, self.positions = list(state["passes"]), list(state["positions"])
        self.weights.load_state_dict(state["weights"])

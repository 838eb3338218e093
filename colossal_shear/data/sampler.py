"""A stateful, distributed sampler that honours bucket order: parts are consumed in order, shuffled only within a
part, and the position is saved in checkpoints so a resumed run sees exactly the sequences the stopped run would."""

from __future__ import annotations

import torch


class BucketSampler:
    """Yields global sequence indices for one data-parallel rank.

    Epoch e's global order is part 0 shuffled, then part 1 shuffled, ... (seeded by seed and e). It is padded by
    wrapping to a multiple of `dp_size`, so every rank gets the same number, and rank r takes order[r::dp_size].
    """

    def __init__(self, part_sizes: list[int], dp_rank: int = 0, dp_size: int = 1, seed: int = 42, shuffle=True):
        if sum(part_sizes) == 0:
            raise ValueError("the dataset holds no sequences")
        self.part_sizes = list(part_sizes)
        self.dp_rank, self.dp_size, self.seed, self.shuffle = dp_rank, dp_size, seed, shuffle
        self.epoch = 0
        self.position = 0  # indices already yielded on this rank in this epoch

    def __len__(self) -> int:
        total = sum(self.part_sizes)
        return -(-total // self.dp_size)

    def _order(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        chunks, offset = [], 0
        for size in self.part_sizes:
            idx = torch.randperm(size, generator=g) if self.shuffle else torch.arange(size)
            chunks.append(idx + offset)
            offset += size
        order = torch.cat(chunks)
        pad = len(self) * self.dp_size - len(order)
        if pad:
            order = torch.cat([order, order[:pad]])
        return order[self.dp_rank :: self.dp_size]

    def take(self, n: int) -> list[int]:
        """The next n indices of this rank, moving to the next epoch (new shuffle) when one ends."""
        out = []
        while len(out) < n:
            order = self._order()
            chunk = order[self.position : self.position + n - len(out)].tolist()
            out.extend(chunk)
            self.position += len(chunk)
            if self.position >= len(order):
                self.epoch += 1
                self.position = 0
        return out

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "dp_size": self.dp_size,
            "part_sizes": self.part_sizes,
        }

    def load_state_dict(self, state: dict) -> None:
        if state["part_sizes"] != self.part_sizes or state["dp_size"] != self.dp_size:
            raise ValueError(
                "the checkpoint's data position belongs to another dataset or data-parallel size "
                f"(parts {state['part_sizes']} on {state['dp_size']} ranks, now {self.part_sizes} on {self.dp_size})"
            )
        self.epoch, self.position, self.seed = state["epoch"], state["position"], state["seed"]

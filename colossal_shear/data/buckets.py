"""Bins and parts ("bucket-based training").

Each category's sequences are shuffled with the seed and cut into `num_spliced_dataset_bins` contiguous bins of
near-equal size (bin of shuffled position j = floor(j * bins / n)). Part k holds bin k of every category, so every
part has the same category mix and the parts, read in order, are the buckets the trainer follows.

When a category has fewer sequences than bins, some of its bins are empty. The number of parts is
min(num_spliced_dataset_bins, largest category's sequence count), so every part holds at least one sequence (of the
largest category) and no part is ever empty. Only O(number of sequences) integers are held in memory.
"""

from __future__ import annotations

import zlib

import numpy as np


def num_parts(counts: dict[str, int], bins: int) -> int:
    return max(0, min(bins, max(counts.values(), default=0)))


def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng([seed & 0xFFFFFFFF, seed >> 32 & 0xFFFFFFFF, *keys])


def assign_bins(counts: dict[str, int], parts: int, seed: int) -> dict[str, list[np.ndarray]]:
    """{category: [row indices (into that category's packed sequences) of bin k, for k in range(parts)]}.

    Each category gets its own stream seeded by (seed, crc32(category)), so adding a category does not reshuffle
    the others."""
    out: dict[str, list[np.ndarray]] = {}
    for cat, n in counts.items():
        perm = _rng(seed, zlib.crc32(cat.encode("utf-8"))).permutation(n)
        bin_of = (np.arange(n, dtype=np.int64) * parts) // max(n, 1)
        edges = np.searchsorted(bin_of, np.arange(parts + 1))
        out[cat] = [perm[edges[k] : edges[k + 1]] for k in range(parts)]
    return out


def part_rows(
    bins: dict[str, list[np.ndarray]], categories: list[str], part: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """The rows of part `part`, shuffled with the seed so categories interleave: (category codes into
    `categories`, row indices within that category)."""
    codes = np.concatenate([np.full(len(bins[c][part]), i, np.int64) for i, c in enumerate(categories)])
    rows = np.concatenate([bins[c][part] for c in categories]).astype(np.int64)
    order = _rng(seed, 0x5EED, part).permutation(len(rows))
    return codes[order], rows[order]

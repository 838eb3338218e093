"""Batches of packed sequences → model inputs that keep packed documents apart.

Each sequence carries `doc_lengths`; the collator turns them into `position_ids` that restart at 0 for each
document and `segment_ids` (one id per document, padding its own segment). `block_causal_mask` makes the 4D
attention mask (causal within a document, nothing across) that Hugging Face Llama accepts in place of a 2D one.
"""

from __future__ import annotations

import torch


def collate(rows: dict) -> dict:
    """`rows` is a column dict as returned by `datasets.Dataset.__getitem__(list_of_indices)`."""
    input_ids = torch.tensor(rows["input_ids"], dtype=torch.long)
    labels = torch.tensor(rows["labels"], dtype=torch.long)
    batch, length = input_ids.shape
    position_ids = torch.zeros(batch, length, dtype=torch.long)
    segment_ids = torch.zeros(batch, length, dtype=torch.long)
    for b, lengths in enumerate(rows["doc_lengths"]):
        start = 0
        for s, n in enumerate(list(lengths) + [length - sum(lengths)]):  # the padding tail is a segment too
            position_ids[b, start : start + n] = torch.arange(n)
            segment_ids[b, start : start + n] = s
            start += n
    return {
        "input_ids": input_ids,
        "labels": labels,
        "position_ids": position_ids,
        "segment_ids": segment_ids,
        "num_docs": torch.tensor([len(l) for l in rows["doc_lengths"]]),
        "categories": list(rows["category"]),
    }


def block_causal_mask(segment_ids: torch.Tensor, dtype: torch.dtype, window: int | None = None) -> torch.Tensor:
    """(B, 1, L, L) additive mask: 0 where token i may attend to token j (j <= i, same document, and i - j < window
    when there is a sliding window), else the dtype's minimum, as Hugging Face's 4D attention-mask convention
    expects."""
    length = segment_ids.shape[1]
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    causal = torch.ones(length, length, dtype=torch.bool, device=segment_ids.device).tril()
    if window:
        causal = causal.triu(-(window - 1))
    allowed = (same & causal)[:, None]
    mask = torch.zeros(allowed.shape, dtype=dtype, device=segment_ids.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)

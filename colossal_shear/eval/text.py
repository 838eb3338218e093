"""Text metrics that do not depend on the tokenizer, per category: what compares a model with an expanded (or
pruned) vocabulary with its original.

Each text (a JSONL record's `Record.text`, i.e. source + target as data preparation reads it; or one non-blank line of
a plain-text file, without its newline) is tokenized without special tokens and scored after the tokenizer's BOS token
(its EOS when it has no BOS), with no EOS after it: its loss is the summed next-token negative log-likelihood (nats) of
its tokens. A text longer than the window (`max_length`, default the model's positions) is scored in consecutive
windows of max_length - 1 tokens, each after BOS again. Per category (the record's `category`, else the file's stem):

    nats_per_char   = sum of the texts' losses / sum of their characters
    tokens_per_char = sum of their tokens / sum of their characters
    loss            = sum of their losses / sum of their tokens  (the per-token loss)
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from colossal_shear.core.errors import UserError
from colossal_shear.data.records import COMPRESSION_SUFFIXES, is_jsonl, iter_lines, iter_records


@dataclass
class TextTotals:
    nats: float = 0.0
    tokens: int = 0
    chars: int = 0
    texts: int = 0

    def add(self, nats: float, tokens: int, chars: int) -> None:
        self.nats += nats
        self.tokens += tokens
        self.chars += chars
        self.texts += 1

    def metrics(self) -> dict:
        return {
            "nats_per_char": self.nats / max(1, self.chars),
            "tokens_per_char": self.tokens / max(1, self.chars),
            "loss": self.nats / max(1, self.tokens),
            "chars": self.chars,
            "tokens": self.tokens,
            "texts": self.texts,
        }


def file_category(path: str | Path) -> str:
    """A file's stem: `zh.jsonl`, `zh.jsonl.gz`, `zh.txt` -> `zh`."""
    name = Path(path).name
    for suffix in COMPRESSION_SUFFIXES:
        name = name.removesuffix(suffix)
    return Path(name).stem or name


def read_texts(paths: Sequence[str | Path]) -> list[tuple[str, str]]:
    """(category, text) of every file: JSONL records (`colossal_shear.data.records`) or plain-text lines. A missing
    or empty file is an error naming it."""
    out = []
    for path in paths:
        if not Path(path).is_file():
            raise UserError(f"--text_eval: {path}: no such file")
        found = list(_file_texts(Path(path)))
        if not found:
            raise UserError(f"--text_eval: {path}: no text in this file (empty, or only blank lines)")
        out += found
    return out


def _file_texts(path: Path) -> Iterator[tuple[str, str]]:
    default = file_category(path)
    if is_jsonl(path):
        for _, _, record in iter_records(path):
            if record.text:
                yield record.category or default, record.text
        return
    for _, line, _ in iter_lines(path):
        text = line.rstrip("\r\n")
        if text.strip():
            yield default, text


def start_token(tokenizer) -> int:
    token = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if token is None:
        raise UserError("the tokenizer has neither a BOS nor an EOS token to start each text with")
    return token


def windows(ids: list[int], start: int, max_length: int) -> list[list[int]]:
    """[start] + consecutive pieces of `ids`, each window at most max_length tokens."""
    step = max(1, max_length - 1)
    return [[start, *ids[i : i + step]] for i in range(0, len(ids), step)]


def score_windows(model, rows: list[list[int]], batch_size: int, progress: bool = False) -> list[float]:
    """The summed next-token loss (nats) of each row's tokens after its first, batched (longest first, right
    padding), through the package's chunked LM loss (no [tokens, vocabulary] logits held)."""
    import torch

    from colossal_shear.train.losses import chunked_cross_entropy, head_weight

    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
    losses = [0.0] * len(rows)
    device, decoder, weight = model.device, model.get_decoder(), head_weight(model)
    bar = _bar(len(rows), progress)
    with torch.no_grad():
        for b in range(0, len(order), batch_size):
            idx = order[b : b + batch_size]
            width = len(rows[idx[0]])
            ids = torch.zeros(len(idx), width, dtype=torch.long)
            mask = torch.zeros(len(idx), width, dtype=torch.long)
            for r, i in enumerate(idx):
                ids[r, : len(rows[i])] = torch.tensor(rows[i])
                mask[r, : len(rows[i])] = 1
            hidden = decoder(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state
            labels = ids.masked_fill(mask == 0, -100)
            for r, i in enumerate(idx):
                losses[i] = float(chunked_cross_entropy(hidden[r : r + 1], weight, labels[r : r + 1], 1.0))
            bar.update(len(idx))
    bar.close()
    return losses


def _bar(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="text metrics", unit="window", disable=not enabled or None, dynamic_ncols=True)


def text_metrics(
    model, tokenizer, paths: Sequence[str | Path], batch_size: int = 8, max_length: int | None = None, progress=False
) -> dict[str, dict]:
    """{category: {nats_per_char, tokens_per_char, loss, chars, tokens, texts}} over the files' texts."""
    texts = read_texts(paths)
    limit = max_length or getattr(model.config, "max_position_embeddings", None) or 2048
    start = start_token(tokenizer)
    rows, owner = [], []
    encoded = tokenizer([t for _, t in texts], add_special_tokens=False).input_ids
    for n, ids in enumerate(encoded):
        for window in windows(ids, start, limit):
            rows.append(window)
            owner.append(n)
    nats = [0.0] * len(texts)
    for n, loss in zip(owner, score_windows(model, rows, batch_size, progress)):
        nats[n] += loss
    totals: dict[str, TextTotals] = {}
    for (category, text), ids, loss in zip(texts, encoded, nats):
        totals.setdefault(category, TextTotals()).add(loss, len(ids), len(text))
    return {category: totals[category].metrics() for category in sorted(totals)}

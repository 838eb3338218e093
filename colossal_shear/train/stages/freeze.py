"""`--train_embeddings new`: train only the embedding / LM-head rows a vocabulary expansion added.

Why: after `init_model.py` the old rows are the original model's; training them in the align stage moves the model
on its old language for no gain. Freezing them exactly keeps the logits over the old vocabulary identical.

How: a tensor hook on the embedding and LM-head weights multiplies the gradient by a 0/1 row mask. Tensor hooks run
on the gradient before it is accumulated into `.grad`, hence before every Booster plugin's own gradient handling
(DDP's reducer and ZeRO-2's bucketing are post-accumulate hooks; Gemini's hook is registered at boost time, after
this one, and receives the masked gradient). The hook is registered before `booster.boost`, on the Parameter objects
the plugins keep (they cast `.data` in place). Those weights also get weight decay 0: AdamW with an exactly-zero
gradient from step 0 keeps its moments at zero and the weight bit-identical (update 0 / (0 + eps) = 0), whereas
decoupled weight decay would shrink the frozen rows. Gradient clipping and loss scaling multiply zeros by a scale:
still zero. Under mixed precision the fp32 master copy of a bf16 weight is exact, so the working copy is too.

Which rows are old: `new_rows.json` (or `id_map.json`) in the model directory, see colossal_shear.embedding_rows.
"""

from __future__ import annotations

import torch

from colossal_shear.train.config import PLUGINS as ALL_PLUGINS
from colossal_shear.vocab.rows import old_rows

FROZEN_ROWS_ATTR = "_colossal_shear_frozen_rows"  # marks a weight whose old rows are frozen (no weight decay)
# every plugin but 3d, whose shardformer replaces and splits the embedding / LM-head matrices
PLUGINS = tuple(p for p in ALL_PLUGINS if p != "3d")


def freeze_old_rows(model, model_dir) -> dict:
    """Zero the gradient of the old rows of the input embeddings and the LM head (once if tied). Returns
    {"frozen_rows": n, "trainable_rows": m, "weights": k} for the log."""
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    weights = [emb] + ([head.weight] if head is not None and head.weight is not emb else [])
    vocab = emb.shape[0]
    for w in weights[1:]:
        if w.shape[0] != vocab:
            raise ValueError(f"LM head has {w.shape[0]} rows but the embeddings {vocab}")
    old = old_rows(model_dir, vocab)
    frozen = torch.zeros(vocab, 1, dtype=torch.bool)
    frozen[old] = True
    for w in weights:
        mask = frozen.to(w.device)

        def hook(grad, mask=mask):  # masked_fill, not a product: an fp16 overflow (inf * 0) would give NaN
            return grad.masked_fill(mask.to(grad.device), 0)

        w.register_hook(hook)
        setattr(w, FROZEN_ROWS_ATTR, True)
    return {"frozen_rows": len(old), "trainable_rows": vocab - len(old), "weights": len(weights)}


def param_groups(params: list, weight_decay: float):
    """AdamW parameter groups: weights with frozen rows get weight decay 0. The plain list when none has."""
    frozen = [p for p in params if getattr(p, FROZEN_ROWS_ATTR, False)]
    if not frozen:
        return params
    rest = [p for p in params if not getattr(p, FROZEN_ROWS_ATTR, False)]
    groups = [{"params": frozen, "weight_decay": 0.0}]
    if rest:
        groups.insert(0, {"params": rest, "weight_decay": weight_decay})
    return groups


def check_train_embeddings(cfg, model_path, model_config) -> None:
    """Pre-flight for `--train_embeddings new` (raises ValueError with the reason)."""
    if cfg.model.train_embeddings != "new":
        return
    if not cfg.freezes_body:
        raise ValueError("--train_embeddings new belongs to the align stage: add --stage align")
    if cfg.parallel.plugin not in PLUGINS:
        raise ValueError(
            f"--train_embeddings new runs under {', '.join(PLUGINS)}: the {cfg.parallel.plugin} plugin's "
            "shardformer replaces and splits the embedding / LM-head matrices, which the row mask "
            "refers to"
        )
    old_rows(model_path, model_config.vocab_size)

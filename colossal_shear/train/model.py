"""Loading the models a run trains or consults, straight in their precision on their device (no LazyInitContext,
which recurses forever on new torch)."""

from __future__ import annotations

import torch

from .config import TrainConfig
from .plugins import device_type, model_dtype


def build_model(cfg: TrainConfig, model_path: str):
    """The model to train; in the align stage only the input embeddings and the LM head keep requires_grad."""
    from transformers import AutoModelForCausalLM

    kwargs = {}
    if device_type() == "cuda" and not cfg.parallel.plugin.startswith("gemini"):
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    model = AutoModelForCausalLM.from_pretrained(
        model_path, torch_dtype=model_dtype(cfg.parallel),
        attn_implementation="flash_attention_2" if cfg.use_flash_attn else "sdpa",
        trust_remote_code=cfg.trust_remote_code, **kwargs)
    if cfg.use_grad_checkpoint:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.freezes_body:
        trainable = {id(model.get_input_embeddings().weight), id(model.get_output_embeddings().weight)}
        for p in model.parameters():
            p.requires_grad_(id(p) in trainable)
    if cfg.train_embeddings == "new":  # old rows frozen by a gradient hook, registered before boost (freeze.py)
        from .freeze import freeze_old_rows

        freeze_old_rows(model, model_path)
    model.config.use_cache = False
    return model


def load_frozen_model(cfg: TrainConfig, path: str, device):
    """A model consulted without gradients (a teacher, a reference), replicated on every rank, in the student's
    weight dtype."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=model_dtype(cfg.parallel),
                                                 attn_implementation="sdpa",
                                                 trust_remote_code=cfg.trust_remote_code).to(device)
    model.eval().requires_grad_(False)
    return model

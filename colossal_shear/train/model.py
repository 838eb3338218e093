"""Loading the models a run trains or consults, straight in their precision on their device (no LazyInitContext,
which recurses forever on new torch)."""

from __future__ import annotations

import warnings

import torch

from colossal_shear.train import attention
from colossal_shear.train.config import TrainConfig
from colossal_shear.train.distributed.plugins import device_type, model_dtype


def attention_implementation(cfg: TrainConfig) -> str:
    """'sdpa', 'flex' or 'flash' for this run (attention.resolve); the refusal comes before any model is loaded."""
    return attention.resolve(cfg.model.attn_implementation, device_type(), cfg.parallel.plugin)


def build_model(cfg: TrainConfig, model_path: str):
    """The model to train; in the align stage only the input embeddings and the LM head keep requires_grad. It
    takes packed batches' `document_ids` (attention.py), computes the chunked LM loss unless --lm_loss full
    (lm_loss.py), and is compiled with --compile (torch.compile of its forward, traced on the first step after
    boosting)."""

    kwargs = {}
    if device_type() == "cuda" and not cfg.parallel.plugin.startswith("gemini"):
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    model = _load(cfg, model_path, **kwargs)
    if cfg.model.lm_loss == "chunked":
        from colossal_shear.train.losses import install_chunked_loss, supports_chunked_loss

        reason = supports_chunked_loss(model)
        if reason is None:
            install_chunked_loss(model)
        else:
            warnings.warn(f"--lm_loss chunked: {reason}; the model's own loss over full logits is used", stacklevel=2)
    if cfg.model.use_grad_checkpoint:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.freezes_body:
        trainable = {id(model.get_input_embeddings().weight), id(model.get_output_embeddings().weight)}
        for p in model.parameters():
            p.requires_grad_(id(p) in trainable)
    if cfg.model.train_embeddings == "new":  # old rows frozen by a gradient hook, registered before boost (freeze.py)
        from colossal_shear.train.stages.freeze import freeze_old_rows

        freeze_old_rows(model, model_path)
    model.config.use_cache = False
    if cfg.model.compile:
        model.compile()
    return model


def load_frozen_model(cfg: TrainConfig, path: str, device):
    """A model consulted without gradients (a teacher, a reference), replicated on every rank, in the student's
    weight dtype."""

    model = _load(cfg, path).to(device)
    model.eval().requires_grad_(False)
    return model


def _load(cfg: TrainConfig, path: str, **kwargs):
    """The HF model in the run's weight dtype, with the run's attention kernel fed packed documents."""
    from transformers import AutoConfig, AutoModelForCausalLM

    implementation = attention_implementation(cfg)
    config = AutoConfig.from_pretrained(path, trust_remote_code=cfg.model.trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(
        path,
        config=config,
        torch_dtype=model_dtype(cfg.parallel),
        attn_implementation=attention.hf_name(implementation, config),
        trust_remote_code=cfg.model.trust_remote_code,
        **kwargs,
    )
    return attention.install(model, implementation)

"""Masked forward of a standard Hugging Face decoder (any family of `colossal_shear.models`) through hooks (no forked
modelling file). What differs between families (norm formula, sandwich norms) comes from the family's adapter.

Semantics (Sheared-LLaMA), for gates z from `PruningMasks` (any subset of the five kinds; a missing kind = all ones):
  * hidden z multiplies the embedding output and every residual contribution (the outputs of o_proj and down_proj,
    or of the sandwich norms after them: Gemma 2/3), so the residual stream is exactly 0 on pruned channels (and
    scaled on partly kept ones);
  * every norm over the hidden channels (input_layernorm, post_attention_layernorm or the sandwich norms, the final
    norm) computes its mean square over the kept channels only (hidden z > 0) and its output by the family's
    formula (w * x_hat, Gemma (1 + w) * x_hat), so a binary hidden mask folds exactly into a smaller model;
  * the effective head gate (head z * its group's z) multiplies each query head's attention context at the input of
    o_proj;
  * intermediate z multiplies the input of down_proj (the MLP's act(gate) * up product);
  * layer z multiplies the residual contributions: z = 0 turns the whole block into the identity.
Gates are cast to the activation dtype. Gradients flow to whatever the gates were computed from (log_alpha).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from colossal_shear.models.registry import adapter_for
from colossal_shear.pruning.masks import effective_heads
from colossal_shear.pruning.shape import PruneShape, head_dim_of


def unwrap(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside common wrappers (DDP `.module`, ColossalAI ModelWrapper `.unwrap()`)."""
    seen = 0
    while seen < 8:
        seen += 1
        if hasattr(model, "unwrap") and callable(model.unwrap) and not hasattr(model, "config"):
            model = model.unwrap()
        elif hasattr(model, "module") and isinstance(model.module, nn.Module) and not hasattr(model, "config"):
            model = model.module
        else:
            break
    return model


def decoder_of(model: nn.Module) -> nn.Module:
    """The decoder stack (`LlamaModel`, ...) of a causal LM of a supported family, or the stack itself."""
    return adapter_for(model.config).decoder(model)


class MaskedModel:
    """Install the pruning masks on `model` as hooks. `masks_fn()` returns a dict of gates; it is called once per
    forward of `model` (a forward pre-hook on it) and every other hook reads that result.

    Use `attach()` / `detach()` or `with MaskedModel(model, fn): ...`. `model` must be the unwrapped Hugging Face
    model (wrappers with `.module` / `.unwrap()` are unwrapped); a Booster-wrapped model still runs the hooks since
    they sit on its inner modules.
    """

    def __init__(self, model: nn.Module, masks_fn):
        self.model = unwrap(model)
        self.masks_fn = masks_fn
        self.base = decoder_of(self.model)
        self.config = self.model.config
        self.adapter = adapter_for(self.config)
        self.source = PruneShape.from_config(self.config)
        self.head_dim = head_dim_of(self.config)
        self.z: dict | None = None  # the gates of the current (last) forward
        self._handles: list = []
        self._prepared: dict = {}
        self._unmasked = False

    # ------------------------------------------------------------------ lifecycle
    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def attach(self) -> MaskedModel:
        if self._handles:
            return self
        h = self._handles
        h.append(self.model.register_forward_pre_hook(self._begin))
        h.append(self.base.embed_tokens.register_forward_hook(self._embed_out))
        for i, layer in enumerate(self.base.layers):
            attn, mlp = layer.self_attn, layer.mlp
            h.append(attn.o_proj.register_forward_pre_hook(self._head_in(i)))
            h.append(mlp.down_proj.register_forward_pre_hook(self._neuron_in(i)))
            for norm in self.adapter.hidden_norms(layer):  # before the residual scale: a sandwich norm is both
                h.append(norm.register_forward_hook(self._norm))
            for module in self.adapter.residual_outputs(layer):
                h.append(module.register_forward_hook(self._residual_out(i)))
        h.append(self.base.norm.register_forward_hook(self._norm))
        return self

    def detach(self) -> MaskedModel:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._prepared = {}
        return self

    def __enter__(self) -> MaskedModel:
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()

    @contextmanager
    def unmasked(self):
        """Forwards inside run with every gate open (the hooks change nothing; `masks_fn` is not called): the parent
        model, as distillation from it needs. On exit the last masked forward's gates are back in place, since a
        non-reentrant checkpoint recomputes that forward's layers during its backward and its hooks read them."""
        saved = self.z, self._prepared
        self._unmasked = True
        try:
            yield self
        finally:
            self._unmasked = False
            self.z, self._prepared = saved

    # ------------------------------------------------------------------ per-forward preparation
    def _begin(self, module, args):
        if self._unmasked:
            self.z, self._prepared = None, {}
            return
        z = self.masks_fn()
        self.z = z
        self._prepared = self.prepare(z)

    def prepare(self, z: dict) -> dict:
        """Derived per-forward tensors: effective head gates [L, H], per-layer residual scales [L, d] (layer z x
        hidden z), the kept-channel ratio d / k for the norms."""
        s = self.source
        out: dict = {}
        hidden, layer = z.get("hidden"), z.get("layer")
        if hidden is not None:
            if tuple(hidden.shape) != (s.hidden,):
                raise ValueError(f"hidden mask shape {tuple(hidden.shape)} != ({s.hidden},)")
            kept = int((hidden > 0).sum())
            if kept == 0:
                raise ValueError("the hidden mask keeps no channel")
            out["hidden"] = hidden
            out["norm_keep"] = (hidden > 0).to(torch.float32) if kept != s.hidden else None
            out["norm_kept"] = kept
        if layer is not None and tuple(layer.shape) != (s.layers,):
            raise ValueError(f"layer mask shape {tuple(layer.shape)} != ({s.layers},)")
        if hidden is not None and layer is not None:
            out["residual"] = layer[:, None] * hidden[None, :]
        elif hidden is not None:
            out["residual"] = hidden[None, :].expand(s.layers, -1)
        elif layer is not None:
            out["residual"] = layer[:, None]
        heads = effective_heads(z, s)
        if heads is not None:
            if tuple(heads.shape) != (s.layers, s.heads):
                raise ValueError(f"head/group masks give shape {tuple(heads.shape)} != ({s.layers}, {s.heads})")
            out["heads"] = heads
        inter = z.get("intermediate")
        if inter is not None:
            if tuple(inter.shape) != (s.layers, s.intermediate):
                raise ValueError(f"intermediate mask shape {tuple(inter.shape)} != ({s.layers}, {s.intermediate})")
            out["intermediate"] = inter
        return out

    # ------------------------------------------------------------------ hooks
    def _embed_out(self, module, args, output):
        hidden = self._prepared.get("hidden")
        if hidden is None:
            return None
        return output * hidden.to(device=output.device, dtype=output.dtype)

    def _head_in(self, i: int):
        def hook(module, args):
            heads = self._prepared.get("heads")
            if heads is None:
                return None
            x = args[0]
            g = heads[i].to(device=x.device, dtype=x.dtype)
            shaped = x.reshape(*x.shape[:-1], self.source.heads, self.head_dim) * g[:, None]
            return (shaped.reshape(x.shape), *args[1:])

        return hook

    def _neuron_in(self, i: int):
        def hook(module, args):
            inter = self._prepared.get("intermediate")
            if inter is None:
                return None
            x = args[0]
            return (x * inter[i].to(device=x.device, dtype=x.dtype), *args[1:])

        return hook

    def _residual_out(self, i: int):
        def hook(module, args, output):
            scale = self._prepared.get("residual")
            if scale is None:
                return None
            return output * scale[i].to(device=output.device, dtype=output.dtype)

        return hook

    def _norm(self, module, args, output):
        keep = self._prepared.get("norm_keep")
        if keep is None:  # every channel kept: the module's own output is already right
            return None
        x = args[0]
        h = x.to(torch.float32)
        # the mean square over the kept channels only (a sandwich norm's input is not 0 on the pruned ones)
        variance = (h.pow(2) * keep.to(h.device)).sum(-1, keepdim=True) / self._prepared["norm_kept"]
        eps = getattr(module, "variance_epsilon", getattr(module, "eps", 1e-6))
        return self.adapter.norm_output(module, h * torch.rsqrt(variance + eps), x)

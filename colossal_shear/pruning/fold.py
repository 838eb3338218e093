"""Fold masks into the weights: a new, smaller, plain Hugging Face model.

For gates z (a binarised mask dict, any subset of the five kinds; a missing kind = all ones):
  * layers with layer z == 0 are dropped; heads / groups / neurons / hidden channels with z == 0 are dropped;
  * kept units are scaled by their z: the effective head gate into o_proj's input columns, intermediate z into
    down_proj's input columns, layer z (x hidden z) into o_proj's and down_proj's output rows, hidden z into the
    embedding columns (untied models only: a tied matrix is also the LM head, which reads the norm's output);
  * RMSNorm weights are sliced to the kept channels (the folded norm's mean runs over exactly those).
The new config keeps the source head_dim explicitly. The masked model (`apply.MaskedModel`) with the same z and the
folded model compute the same function.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
from torch import nn

from colossal_shear.core.fsutil import atomic_dir, copy_tokenizer_files
from colossal_shear.pruning.masked_model import decoder_of, unwrap
from colossal_shear.pruning.masks import effective_heads
from colossal_shear.pruning.shape import PruneShape, head_dim_of


def _kept(v: torch.Tensor) -> torch.Tensor:
    return torch.nonzero(v != 0, as_tuple=False).flatten()


def folded_layout(config, z: dict) -> dict:
    """Which layers / groups / heads / neurons / channels survive, per kept layer; checks the layout is uniform."""
    s = PruneShape.from_config(config)
    ones = lambda *shape: torch.ones(shape)  # noqa: E731
    zc = {k: v.detach().float().cpu() for k, v in z.items() if v is not None}
    expected = {
        "hidden": (s.hidden,),
        "layer": (s.layers,),
        "group": (s.layers, s.kv_heads),
        "head": (s.layers, s.heads),
        "intermediate": (s.layers, s.intermediate),
    }
    for k, v in zc.items():
        if k not in expected:
            raise ValueError(f"unknown mask kind {k!r} (expected {', '.join(expected)})")
        if tuple(v.shape) != expected[k]:
            raise ValueError(f"mask {k!r} has shape {tuple(v.shape)}, expected {expected[k]}")
        if not torch.isfinite(v).all() or (v < 0).any():
            raise ValueError(f"mask {k!r} must be finite and >= 0")
    hidden = zc.get("hidden", ones(s.hidden))
    layer = zc.get("layer", ones(s.layers))
    heads = effective_heads(zc, s)
    heads = ones(s.layers, s.heads) if heads is None else heads
    inter = zc.get("intermediate", ones(s.layers, s.intermediate))
    ratio = s.heads // s.kv_heads
    kept_layers = _kept(layer).tolist()
    if not kept_layers:
        raise ValueError("the layer mask removes every layer")
    kept_hidden = _kept(hidden)
    if kept_hidden.numel() == 0:
        raise ValueError("the hidden mask removes every channel")
    per_layer, counts = [], set()
    for i in kept_layers:
        h = heads[i].view(s.kv_heads, ratio) != 0
        groups = torch.nonzero(h.any(-1)).flatten()
        per_group = {int(h[g].sum()) for g in groups}
        neurons = _kept(inter[i])
        if len(groups) == 0:
            raise ValueError(f"layer {i} keeps no attention head (remove the layer with the layer mask instead)")
        if len(per_group) != 1:
            raise ValueError(
                f"layer {i}: kept KV groups keep different numbers of query heads {sorted(per_group)}; "
                "grouped-query attention needs the same number in every group"
            )
        if neurons.numel() == 0:
            raise ValueError(f"layer {i} keeps no MLP neuron (remove the layer with the layer mask instead)")
        counts.add((len(groups), per_group.pop(), int(neurons.numel())))
        per_layer.append({"layer": i, "groups": groups, "heads": _kept(heads[i]), "neurons": neurons})
    if len(counts) != 1:
        raise ValueError(
            "kept layers have different shapes (kv groups, heads per group, neurons): "
            f"{sorted(counts)}; a Hugging Face Llama config needs one shape for every layer"
        )
    n_groups, per_group, n_neurons = counts.pop()
    shape = PruneShape(
        hidden=int(kept_hidden.numel()),
        heads=n_groups * per_group,
        layers=len(kept_layers),
        intermediate=n_neurons,
        kv_heads=n_groups,
    )
    return {
        "shape": shape,
        "hidden": hidden,
        "layer": layer,
        "heads": heads,
        "intermediate": inter,
        "kept_hidden": kept_hidden,
        "layers": per_layer,
    }


@torch.no_grad()
def fold(model: nn.Module, z: dict, target: PruneShape | None = None) -> nn.Module:
    """A new smaller plain HF model of the same class with the masks `z` folded in (the source is not modified).
    With `target`, the folded shape must equal it (ValueError otherwise)."""
    model = unwrap(model)
    base = decoder_of(model)
    config = model.config
    source = PruneShape.from_config(config)
    hd = head_dim_of(config)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    lay = folded_layout(config, z)
    shape: PruneShape = lay["shape"]
    if target is not None and shape != target:
        raise ValueError(f"the masks fold to {shape.describe()}, not the target {target.describe()}")
    shape.validate_against(source)
    kh = lay["kept_hidden"]
    hidden_scale = lay["hidden"][kh]
    if tied and not torch.all(hidden_scale == 1):
        raise ValueError(
            "a tied model needs hidden mask values of exactly 0 or 1: a scale on hidden channels cannot "
            "be folded into a matrix that is both the embedding and the LM head"
        )

    def dev(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return t.to(like.device)

    def scaled(w: torch.Tensor, rows=None, cols=None, row_scale=None, col_scale=None) -> torch.Tensor:
        out = w
        if rows is not None:
            out = out.index_select(0, dev(rows, w))
        if cols is not None:
            out = out.index_select(1, dev(cols, w))
        if row_scale is None and col_scale is None:
            return out.clone()
        out = out.float()
        if row_scale is not None:
            out = out * dev(row_scale, w).view(-1, *([1] * (out.dim() - 1)))
        if col_scale is not None:
            out = out * dev(col_scale, w)
        return out.to(w.dtype)

    def rows_of(units: torch.Tensor, size: int) -> torch.Tensor:  # head/group indices -> weight rows
        return (units[:, None] * size + torch.arange(size)).flatten()

    sd: dict[str, torch.Tensor] = {}
    prefix = "model." if base is not model else ""
    emb = base.embed_tokens.weight
    sd[prefix + "embed_tokens.weight"] = scaled(emb, cols=kh, col_scale=None if tied else hidden_scale)
    sd[prefix + "norm.weight"] = scaled(base.norm.weight, rows=kh)
    for j, info in enumerate(lay["layers"]):
        i = info["layer"]
        src = base.layers[i]
        p = f"{prefix}layers.{j}."
        attn, mlp = src.self_attn, src.mlp
        q_rows, kv_rows = rows_of(info["heads"], hd), rows_of(info["groups"], hd)
        head_scale = lay["heads"][i][info["heads"]].repeat_interleave(hd)
        out_scale = lay["layer"][i] * hidden_scale
        sd[p + "input_layernorm.weight"] = scaled(src.input_layernorm.weight, rows=kh)
        sd[p + "post_attention_layernorm.weight"] = scaled(src.post_attention_layernorm.weight, rows=kh)
        sd[p + "self_attn.q_proj.weight"] = scaled(attn.q_proj.weight, rows=q_rows, cols=kh)
        sd[p + "self_attn.k_proj.weight"] = scaled(attn.k_proj.weight, rows=kv_rows, cols=kh)
        sd[p + "self_attn.v_proj.weight"] = scaled(attn.v_proj.weight, rows=kv_rows, cols=kh)
        sd[p + "self_attn.o_proj.weight"] = scaled(
            attn.o_proj.weight, rows=kh, cols=q_rows, row_scale=out_scale, col_scale=head_scale
        )
        for name, rows in (("q_proj", q_rows), ("k_proj", kv_rows), ("v_proj", kv_rows)):
            bias = getattr(attn, name).bias
            if bias is not None:
                sd[p + f"self_attn.{name}.bias"] = scaled(bias, rows=rows)
        if attn.o_proj.bias is not None:
            sd[p + "self_attn.o_proj.bias"] = scaled(attn.o_proj.bias, rows=kh, row_scale=out_scale)
        n = info["neurons"]
        sd[p + "mlp.gate_proj.weight"] = scaled(mlp.gate_proj.weight, rows=n, cols=kh)
        sd[p + "mlp.up_proj.weight"] = scaled(mlp.up_proj.weight, rows=n, cols=kh)
        sd[p + "mlp.down_proj.weight"] = scaled(
            mlp.down_proj.weight, rows=kh, cols=n, row_scale=out_scale, col_scale=lay["intermediate"][i][n]
        )
        for name in ("gate_proj", "up_proj"):
            bias = getattr(mlp, name).bias
            if bias is not None:
                sd[p + f"mlp.{name}.bias"] = scaled(bias, rows=n)
        if mlp.down_proj.bias is not None:
            sd[p + "mlp.down_proj.bias"] = scaled(mlp.down_proj.bias, rows=kh, row_scale=out_scale)
    if base is not model:
        head = model.get_output_embeddings()
        sd["lm_head.weight"] = sd[prefix + "embed_tokens.weight"] if tied else scaled(head.weight, cols=kh)

    new_config = copy.deepcopy(config)
    new_config.hidden_size = shape.hidden
    new_config.num_attention_heads = shape.heads
    new_config.num_key_value_heads = shape.kv_heads
    new_config.num_hidden_layers = shape.layers
    new_config.intermediate_size = shape.intermediate
    new_config.head_dim = hd
    new = _build(type(model), new_config, sd, emb.device)
    if getattr(model, "generation_config", None) is not None and hasattr(new, "generation_config"):
        new.generation_config = copy.deepcopy(model.generation_config)
    return new.eval()


def _build(cls, config, state: dict, device) -> nn.Module:
    """Instantiate `cls(config)` without initialising weights (meta device), then take `state` as its tensors."""
    with torch.device("meta"):
        new = cls(config)
    missing = set(new.state_dict()) - set(state)
    extra = set(state) - set(new.state_dict())
    if missing or extra:
        raise ValueError(
            f"cannot fold a {cls.__name__}: weights missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(extra)[:5]} (only LLaMA-style models are supported)"
        )
    new.load_state_dict(state, strict=True, assign=True)
    if getattr(config, "tie_word_embeddings", False):
        new.tie_weights()
    # non-persistent buffers (rotary inv_freq) are not in the state dict: rebuild those modules on the real device
    for name, module in list(new.named_modules()):
        if any(b.is_meta for b in module.buffers(recurse=False)):
            if not hasattr(module, "rope_init_fn") and "rotary" not in type(module).__name__.lower():
                raise ValueError(f"cannot rebuild buffers of {name} ({type(module).__name__})")
            parent, _, attr = name.rpartition(".")
            rebuilt = type(module)(config=config, device=device)
            setattr(new.get_submodule(parent) if parent else new, attr, rebuilt)
    leftover = [n for n, t in list(new.named_parameters()) + list(new.named_buffers()) if t.is_meta]
    if leftover:
        raise ValueError(f"folding left tensors uninitialised: {leftover[:5]}")
    return new


def save_folded(
    model: nn.Module, z: dict | None, out_dir, tokenizer_dir=None, overwrite: bool = False, max_shard_size: str = "5GB"
) -> Path:
    """Fold `z` into `model` (z=None: `model` is already the folded model) and write a plain HF directory
    (safetensors + config.json [+ tokenizer files from `tokenizer_dir`]) atomically: built in a sibling temporary
    directory, then renamed into place. An existing non-empty `out_dir` is refused unless `overwrite`."""
    out = Path(os.path.expanduser(str(out_dir)))
    if out.exists() and not overwrite and not (out.is_dir() and not any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not empty (pass overwrite)")
    small = fold(model, z) if z is not None else unwrap(model)
    with atomic_dir(out, overwrite) as tmp:
        small.save_pretrained(tmp, safe_serialization=True, max_shard_size=max_shard_size)
        if tokenizer_dir is not None:
            copy_tokenizer_files(tokenizer_dir, tmp)
    return out

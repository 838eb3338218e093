"""Fold masks into the weights: a new, smaller, plain Hugging Face model.

For gates z (a binarised mask dict, any subset of the five kinds; a missing kind = all ones):
  * layers with layer z == 0 are dropped; heads / groups / neurons / hidden channels with z == 0 are dropped;
  * kept units are scaled by their z: the effective head gate into o_proj's input columns, intermediate z into
    down_proj's input columns, layer z (x hidden z) into o_proj's and down_proj's output rows, hidden z into the
    embedding columns (untied models only: a tied matrix is also the LM head, which reads the norm's output);
  * norm weights are sliced to the kept channels (the folded norm's mean runs over exactly those);
  * what differs between families (which rows a head / neuron owns in fused projections, q/k norms, sandwich norms
    that carry the residual scale, the embedding scale) comes from the family's adapter (`colossal_shear.models`).
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
from colossal_shear.models.base import ModelFamilyError
from colossal_shear.models.registry import adapter_for
from colossal_shear.pruning.masked_model import decoder_of, unwrap
from colossal_shear.pruning.masks import effective_heads
from colossal_shear.pruning.shape import PruneShape, head_dim_of


def _kept(v: torch.Tensor) -> torch.Tensor:
    return torch.nonzero(v != 0, as_tuple=False).flatten()


MASK_DIMS = {  # each mask kind's shape, by PruneShape field
    "hidden": ("hidden",),
    "layer": ("layers",),
    "group": ("layers", "kv_heads"),
    "head": ("layers", "heads"),
    "intermediate": ("layers", "intermediate"),
}


def folded_layout(config, z: dict) -> dict:
    """Which layers / groups / heads / neurons / channels survive, per kept layer; checks the layout is uniform."""
    s = PruneShape.from_config(config)
    zc = {k: v.detach().float().cpu() for k, v in z.items() if v is not None}
    _check_masks(zc, s)
    gates = _gates(zc, s)
    kept_layers = _kept(gates["layer"]).tolist()
    if not kept_layers:
        raise ValueError("the layer mask removes every layer")
    kept_hidden = _kept(gates["hidden"])
    if kept_hidden.numel() == 0:
        raise ValueError("the hidden mask removes every channel")
    per_layer = [_layer_units(i, gates["heads"][i], gates["intermediate"][i], s) for i in kept_layers]
    return {
        "shape": _uniform_shape(per_layer, kept_hidden),
        "source": s,
        **gates,
        "kept_hidden": kept_hidden,
        "layers": per_layer,
    }


def _check_masks(zc: dict, s: PruneShape) -> None:
    """Every mask is of a known kind, of its kind's shape, finite and >= 0."""
    for k, v in zc.items():
        if k not in MASK_DIMS:
            raise ValueError(f"unknown mask kind {k!r} (expected {', '.join(MASK_DIMS)})")
        expected = tuple(getattr(s, d) for d in MASK_DIMS[k])
        if tuple(v.shape) != expected:
            raise ValueError(f"mask {k!r} has shape {tuple(v.shape)}, expected {expected}")
        if not torch.isfinite(v).all() or (v < 0).any():
            raise ValueError(f"mask {k!r} must be finite and >= 0")


def _gates(zc: dict, s: PruneShape) -> dict:
    """The gates of hidden channels, layers, query heads (group gates folded in) and neurons; a missing kind = 1."""
    heads = effective_heads(zc, s)
    return {
        "hidden": zc.get("hidden", torch.ones(s.hidden)),
        "layer": zc.get("layer", torch.ones(s.layers)),
        "heads": torch.ones(s.layers, s.heads) if heads is None else heads,
        "intermediate": zc.get("intermediate", torch.ones(s.layers, s.intermediate)),
    }


def _layer_units(i: int, head_gates: torch.Tensor, neuron_gates: torch.Tensor, s: PruneShape) -> dict:
    """Kept layer i's surviving KV groups, query heads and neurons; refuses a layer grouped-query attention or the
    MLP cannot keep."""
    h = head_gates.view(s.kv_heads, s.heads // s.kv_heads) != 0
    groups = torch.nonzero(h.any(-1)).flatten()
    per_group = {int(h[g].sum()) for g in groups}
    neurons = _kept(neuron_gates)
    if len(groups) == 0:
        raise ValueError(f"layer {i} keeps no attention head (remove the layer with the layer mask instead)")
    if len(per_group) != 1:
        raise ValueError(
            f"layer {i}: kept KV groups keep different numbers of query heads {sorted(per_group)}; "
            "grouped-query attention needs the same number in every group"
        )
    if neurons.numel() == 0:
        raise ValueError(f"layer {i} keeps no MLP neuron (remove the layer with the layer mask instead)")
    return {"layer": i, "groups": groups, "heads": _kept(head_gates), "neurons": neurons}


def _uniform_shape(per_layer: list[dict], kept_hidden: torch.Tensor) -> PruneShape:
    """The folded shape, when every kept layer keeps the same numbers of groups, heads per group and neurons."""
    counts = {(len(u["groups"]), len(u["heads"]) // len(u["groups"]), len(u["neurons"])) for u in per_layer}
    if len(counts) != 1:
        raise ValueError(
            "kept layers have different shapes (kv groups, heads per group, neurons): "
            f"{sorted(counts)}; a Hugging Face Llama config needs one shape for every layer"
        )
    n_groups, per_group, n_neurons = counts.pop()
    return PruneShape(
        hidden=int(kept_hidden.numel()),
        heads=n_groups * per_group,
        layers=len(per_layer),
        intermediate=n_neurons,
        kv_heads=n_groups,
    )


@torch.no_grad()
def fold(model: nn.Module, z: dict, target: PruneShape | None = None) -> nn.Module:
    """A new smaller plain HF model of the same class with the masks `z` folded in (the source is not modified).
    With `target`, the folded shape must equal it (ValueError otherwise)."""
    model = unwrap(model)
    device = decoder_of(model).embed_tokens.weight.device
    config = model.config
    adapter = adapter_for(config)
    source = PruneShape.from_config(config)
    hd = head_dim_of(config)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    lay = folded_layout(config, z)
    _check_foldable(lay, source, target, tied)
    new_config = _folded_config(config, lay["shape"], hd)
    _check_layer_types(adapter, lay, new_config)
    new = _build(model, new_config, _folded_state(model, lay, hd, tied, adapter), device, adapter)
    if getattr(model, "generation_config", None) is not None and hasattr(new, "generation_config"):
        new.generation_config = copy.deepcopy(model.generation_config)
    return new.eval()


def _check_foldable(lay: dict, source: PruneShape, target: PruneShape | None, tied: bool) -> None:
    """The folded shape is the target (when given) and fits the source; a tied model's hidden gates are 0 / 1."""
    shape: PruneShape = lay["shape"]
    if target is not None and shape != target:
        raise ValueError(f"the masks fold to {shape.describe()}, not the target {target.describe()}")
    shape.validate_against(source)
    if tied and not torch.all(lay["hidden"][lay["kept_hidden"]] == 1):
        raise ValueError(
            "a tied model needs hidden mask values of exactly 0 or 1: a scale on hidden channels cannot "
            "be folded into a matrix that is both the embedding and the LM head"
        )


def _check_layer_types(adapter, lay: dict, new_config) -> None:
    """Every kept layer keeps its attention type (sliding / global) at its new index."""
    before = adapter.layer_types()
    kept = [before[u["layer"]] for u in lay["layers"]]
    after = adapter.layer_types(new_config)
    if kept != after:
        raise ModelFamilyError(
            f"the kept layers {[u['layer'] for u in lay['layers']]} have attention types {kept}, but a "
            f"{lay['shape'].layers}-layer {new_config.model_type} config gives {after}: choose layers that keep the "
            "pattern"
        )


def _folded_config(config, shape: PruneShape, hd: int):
    """The source config with the folded shape; the head dimension kept explicitly."""
    new_config = copy.deepcopy(config)
    new_config.hidden_size = shape.hidden
    new_config.num_attention_heads = shape.heads
    new_config.num_key_value_heads = shape.kv_heads
    new_config.num_hidden_layers = shape.layers
    new_config.intermediate_size = shape.intermediate
    new_config.head_dim = hd
    return new_config


def _scaled(w: torch.Tensor, rows=None, cols=None, row_scale=None, col_scale=None) -> torch.Tensor:
    """w's selected rows / columns (a copy), scaled (in fp32, back to w's dtype) by row and column gates."""
    out = w
    if rows is not None:
        out = out.index_select(0, rows.to(w.device))
    if cols is not None:
        out = out.index_select(1, cols.to(w.device))
    if row_scale is None and col_scale is None:
        return out.clone()
    out = out.float()
    if row_scale is not None:
        out = out * row_scale.to(w.device).view(-1, *([1] * (out.dim() - 1)))
    if col_scale is not None:
        out = out * col_scale.to(w.device)
    return out.to(w.dtype)


def _rows_of(units: torch.Tensor, size: int) -> torch.Tensor:
    """Head / group indices -> their weight rows."""
    return (units[:, None] * size + torch.arange(size)).flatten()


def _folded_state(model: nn.Module, lay: dict, hd: int, tied: bool, adapter) -> dict[str, torch.Tensor]:
    """The folded model's state dict: embedding, final norm, the kept layers renumbered, the LM head. A family whose
    embedding output is scaled by sqrt(hidden) keeps the source's scale: the embedding rows are scaled by
    sqrt(d / d') (Hugging Face recomputes sqrt(d') from the new config) and, tied, the final norm's output by the
    inverse, so that the shared matrix gives the same logits."""
    base = decoder_of(model)
    prefix = "model." if base is not model else ""
    kh = lay["kept_hidden"]
    ratio = adapter.embed_scale(lay["source"].hidden) / adapter.embed_scale(lay["shape"].hidden)
    col_scale = None if tied else lay["hidden"][kh]
    if ratio != 1.0:
        col_scale = torch.full((len(kh),), ratio) if col_scale is None else col_scale * ratio
    emb = _scaled(base.embed_tokens.weight, cols=kh, col_scale=col_scale)
    norm = _scaled(base.norm.weight, rows=kh)
    if tied and ratio != 1.0:
        norm = adapter.scaled_norm_weight(norm, 1.0 / ratio)
    sd = {prefix + "embed_tokens.weight": emb, prefix + "norm.weight": norm}
    for j, units in enumerate(lay["layers"]):
        sd.update(_folded_layer(base.layers[units["layer"]], f"{prefix}layers.{j}.", units, lay, hd, adapter))
    if base is not model:
        head = model.get_output_embeddings()
        sd["lm_head.weight"] = emb if tied else _scaled(head.weight, cols=kh)
    return sd


def _folded_layer(src: nn.Module, p: str, units: dict, lay: dict, hd: int, adapter) -> dict[str, torch.Tensor]:
    """One kept decoder layer's tensors under the prefix `p`; its residual contributions scaled by the layer gate
    (x hidden gates): in the output projections' rows, or in the sandwich norms after them."""
    i, kh = units["layer"], lay["kept_hidden"]
    out_scale = lay["layer"][i] * lay["hidden"][kh]
    sd = {p + f"{n}.weight": _scaled(getattr(src, n).weight, rows=kh) for n in adapter.pre_norms}
    for n in adapter.post_norms:
        sd[p + f"{n}.weight"] = adapter.scaled_norm_weight(_scaled(getattr(src, n).weight, rows=kh), out_scale)
    proj_scale = None if adapter.post_norms else out_scale
    sd.update(_folded_attention(src.self_attn, p + "self_attn.", units, lay, hd, proj_scale, adapter))
    sd.update(_folded_mlp(src.mlp, p + "mlp.", units, lay, proj_scale, adapter))
    return sd


def _folded_attention(attn, p: str, units: dict, lay: dict, hd: int, out_scale, adapter) -> dict[str, torch.Tensor]:
    """The kept heads' q rows and groups' k / v rows (the family says which projection rows they own); o_proj's input
    columns scaled by the effective head gates; the per-head_dim q / k norms as they are."""
    kh, source = lay["kept_hidden"], lay["source"]
    q_rows, kv_rows = _rows_of(units["heads"], hd), _rows_of(units["groups"], hd)
    head_scale = lay["heads"][units["layer"]][units["heads"]].repeat_interleave(hd)
    rows = adapter.attention_in_rows(q_rows, kv_rows, source)
    sd = {p + f"{name}.weight": _scaled(getattr(attn, name).weight, rows=r, cols=kh) for name, r in rows.items()}
    sd[p + "o_proj.weight"] = _scaled(
        attn.o_proj.weight, rows=kh, cols=q_rows, row_scale=out_scale, col_scale=head_scale
    )
    for name in adapter.head_norms:
        sd[p + f"{name}.weight"] = getattr(attn, name).weight.detach().clone()
    return sd | _folded_biases(attn, p, rows, "o_proj", kh, out_scale)


def _folded_mlp(mlp, p: str, units: dict, lay: dict, out_scale, adapter) -> dict[str, torch.Tensor]:
    """The kept neurons' input rows (gate / up, or the fused gate_up); down_proj's input columns scaled by their
    gates."""
    kh, neurons = lay["kept_hidden"], units["neurons"]
    gates = lay["intermediate"][units["layer"]][neurons]
    rows = adapter.mlp_in_rows(neurons, lay["source"])
    sd = {p + f"{name}.weight": _scaled(getattr(mlp, name).weight, rows=r, cols=kh) for name, r in rows.items()}
    sd[p + "down_proj.weight"] = _scaled(
        mlp.down_proj.weight, rows=kh, cols=neurons, row_scale=out_scale, col_scale=gates
    )
    return sd | _folded_biases(mlp, p, rows, "down_proj", kh, out_scale)


def _folded_biases(module, p: str, in_rows: dict, out_name: str, kh, out_scale) -> dict[str, torch.Tensor]:
    """The kept rows of each input projection's bias; the output projection's bias scaled like its weight rows."""
    sd = {}
    for name, rows in in_rows.items():
        bias = getattr(module, name).bias
        if bias is not None:
            sd[p + f"{name}.bias"] = _scaled(bias, rows=rows)
    out_bias = getattr(module, out_name).bias
    if out_bias is not None:
        sd[p + f"{out_name}.bias"] = _scaled(out_bias, rows=kh, row_scale=out_scale)
    return sd


def _build(source: nn.Module, config, state: dict, device, adapter) -> nn.Module:
    """Instantiate the source's class with `config` without initialising weights (meta device), then take `state` as
    its tensors; non-persistent buffers (rotary inv_freq) copied from the source's module of the same name (they
    depend on head_dim and the rope settings, which folding keeps), shape-dependent ones set by the family."""
    cls = type(source)
    with torch.device("meta"):
        new = cls(config)
    missing = set(new.state_dict()) - set(state)
    extra = set(state) - set(new.state_dict())
    if missing or extra:
        raise ValueError(
            f"cannot fold a {cls.__name__}: weights missing {sorted(missing)[:5]}, unexpected {sorted(extra)[:5]}"
        )
    new.load_state_dict(state, strict=True, assign=True)
    if getattr(config, "tie_word_embeddings", False):
        new.tie_weights()
    adapter.fix_buffers(new, config)
    for name, module in list(new.named_modules()):
        if any(b.is_meta for b in module.buffers(recurse=False)):
            if not hasattr(module, "rope_init_fn") and "rotary" not in type(module).__name__.lower():
                raise ValueError(f"cannot rebuild buffers of {name} ({type(module).__name__})")
            parent, _, attr = name.rpartition(".")
            rebuilt = copy.deepcopy(source.get_submodule(name)).to(device)
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

"""One-shot structured pruning (no training): choose binary masks of exactly the target shape, then fold them.

* `importance_masks` (Minitron): activation importance on calibration batches. For an activation a[b, t, c]:
  mean over the sequence of |a| (real tokens only), then the L2 norm over all calibration samples. Hidden channels
  are scored at the outputs of input_layernorm and post_attention_layernorm (summed over layers); query heads at
  o_proj's input (the per-token L2 norm of each head's context vector, aggregated the same way); KV groups by the sum
  of their heads' scores; neurons at down_proj's input; layers by block influence (below).
* `depth_masks`: block influence BI = 1 - cos(h_in, h_out) per layer (mean over tokens); the lowest-BI layers go.
  Or an explicit list of layers to keep. Depth pruning removes whole layers only: a target with a smaller width is
  refused (use importance, which prunes width and depth).
* `random_masks` (OpenBA-V2's baseline): the same structure chosen at random.
All return binary mask dicts (the five kinds of `masks.KINDS`) for `fold.fold` / `fold.save_folded`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from colossal_shear.core.constants import DTYPES
from colossal_shear.models.registry import adapter_for
from colossal_shear.pruning.config import METHODS, OneShotConfig
from colossal_shear.pruning.masked_model import decoder_of, unwrap
from colossal_shear.pruning.masks import kind_shapes, select
from colossal_shear.pruning.shape import PruneError, PruneShape, head_dim_of


# ---------------------------------------------------------------------------------------------- batches
def _batches(batches, device) -> Iterable[tuple[torch.Tensor, torch.Tensor | None]]:
    for b in batches:
        if isinstance(b, torch.Tensor):
            ids, mask = b, None
        elif isinstance(b, dict):
            ids, mask = b["input_ids"], b.get("attention_mask")
        else:
            raise TypeError(f"a calibration batch is a LongTensor [B, T] or a dict with input_ids, got {type(b)}")
        ids = torch.as_tensor(ids)
        if ids.dim() == 1:
            ids = ids[None]
        if mask is not None:
            mask = torch.as_tensor(mask).view(ids.shape).to(device)
        yield ids.to(device), mask


class _Stats:
    """Accumulates sum over samples of (mean over real tokens of x)^2, per channel."""

    def __init__(self):
        self.sq = None

    def add(self, x: torch.Tensor, token_mask: torch.Tensor) -> None:  # x [B, T, C] (>= 0), token_mask [B, T]
        m = token_mask.to(torch.float32)[..., None]
        mean = (x.float() * m).sum(1) / m.sum(1).clamp(min=1)
        sq = mean.pow(2).sum(0)
        self.sq = sq if self.sq is None else self.sq + sq

    def l2(self) -> torch.Tensor:
        return self.sq.sqrt()


class _ImportanceHooks:
    """Forward hooks on a decoder's layers that accumulate the calibration statistics of every kind."""

    def __init__(self, s: PruneShape, hd: int, device, adapter):
        self.s, self.hd, self.adapter = s, hd, adapter
        self.norm_stats = [[_Stats() for _ in adapter.pre_norms] for _ in range(s.layers)]
        self.head_stats = [_Stats() for _ in range(s.layers)]
        self.neuron_stats = [_Stats() for _ in range(s.layers)]
        self.cos_sum = torch.zeros(s.layers, dtype=torch.float64, device=device)
        self.tokens = torch.zeros((), dtype=torch.float64, device=device)
        self.mask = None  # the current batch's real tokens [B, T]
        self.handles = []

    def register(self, layers, want_width: bool, want_depth: bool) -> None:
        for i, layer in enumerate(layers):
            if want_width:
                for norm, stats in zip(self.adapter.scored_norms(layer), self.norm_stats[i]):
                    self.handles.append(norm.register_forward_hook(self._abs_out(stats)))
                self.handles.append(layer.self_attn.o_proj.register_forward_pre_hook(self._head_norms(i)))
                self.handles.append(layer.mlp.down_proj.register_forward_pre_hook(self._abs_in(self.neuron_stats[i])))
            if want_depth:
                self.handles.append(layer.register_forward_hook(self._block_influence(i), with_kwargs=True))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    def _abs_out(self, stats: _Stats):
        return lambda mod, args, out: stats.add(out.abs(), self.mask)

    def _abs_in(self, stats: _Stats):
        return lambda mod, args: stats.add(args[0].abs(), self.mask)

    def _head_norms(self, i: int):
        def hook(mod, args):
            x = args[0]
            per_head = x.float().reshape(*x.shape[:-1], self.s.heads, self.hd).norm(dim=-1)
            self.head_stats[i].add(per_head, self.mask)

        return hook

    def _block_influence(self, i: int):
        def hook(mod, args, kwargs, out):
            h_in = args[0] if args else kwargs["hidden_states"]
            h_out = out[0] if isinstance(out, (tuple, list)) else out
            cos = torch.nn.functional.cosine_similarity(h_in.float(), h_out.float(), dim=-1)  # [B, T]
            self.cos_sum[i] += (cos.double() * self.mask.double()).sum()

        return hook

    def scores(self, want_width: bool, want_depth: bool) -> dict:
        out = {}
        if want_width:
            out["hidden"] = sum(st.l2() for pair in self.norm_stats for st in pair)
            out["head"] = torch.stack([st.l2() for st in self.head_stats])
            out["intermediate"] = torch.stack([st.l2() for st in self.neuron_stats])
        if want_depth:
            out["layer"] = (1 - self.cos_sum / self.tokens).float()
        return out


@torch.no_grad()
def collect_importance(model: nn.Module, batches, want_width: bool = True, want_depth: bool = True) -> dict:
    """Run the calibration batches once; return {'hidden' [d], 'head' [L, H], 'intermediate' [L, F],
    'layer' [L] (block influence)} (fp32, on the model's device)."""
    model = unwrap(model)
    base = decoder_of(model)
    device = base.embed_tokens.weight.device
    config = model.config
    hooks = _ImportanceHooks(PruneShape.from_config(config), head_dim_of(config), device, adapter_for(config))
    try:
        hooks.register(base.layers, want_width, want_depth)
        _run_calibration(model, base, batches, device, hooks)
    finally:
        hooks.remove()
    if hooks.tokens.item() == 0:
        raise PruneError("no calibration tokens (empty batches)")
    return hooks.scores(want_width, want_depth)


def _run_calibration(model: nn.Module, base: nn.Module, batches, device, hooks: _ImportanceHooks) -> None:
    """The decoder's forward over every batch, in eval mode (the model's mode restored after)."""
    was_training = model.training
    model.eval()
    try:
        for ids, mask in _batches(batches, device):
            hooks.mask = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
            hooks.tokens += hooks.mask.sum()
            base(input_ids=ids, attention_mask=mask, use_cache=False)
    finally:
        model.train(was_training)


def group_scores(head: torch.Tensor, s: PruneShape) -> torch.Tensor:
    return head.view(s.layers, s.kv_heads, s.heads // s.kv_heads).sum(-1)


def importance_masks(model: nn.Module, batches, target: PruneShape) -> dict:
    """Minitron activation importance (width) and block influence (depth): binary masks of exactly `target`."""
    model = unwrap(model)
    source = PruneShape.from_config(model.config)
    target.validate_against(source)
    scores = collect_importance(model, batches, want_width=True, want_depth=target.layers < source.layers)
    scores["group"] = group_scores(scores["head"], source)
    return select(source, target, scores, layer_pattern=adapter_for(model.config).layer_pattern(target.layers))


def depth_masks(model: nn.Module, batches, target: PruneShape | None, layers: list[int] | None = None) -> dict:
    """Remove whole layers: the lowest block influence on `batches`, or keep exactly `layers` (then `batches` may be
    None and `target` may be None, meaning the source width with len(layers) layers). Refuses a narrower target."""
    model = unwrap(model)
    source = PruneShape.from_config(model.config)
    if target is None:
        if layers is None:
            raise PruneError("depth pruning needs a target shape or a list of layers to keep")
        target = PruneShape(source.hidden, source.heads, len(set(layers)), source.intermediate, source.kv_heads)
    target.validate_against(source)
    narrower = [k for k in ("hidden", "heads", "kv_heads", "intermediate") if getattr(target, k) != getattr(source, k)]
    if narrower:
        raise PruneError(
            f"depth pruning removes whole layers only, but the target also shrinks {', '.join(narrower)} "
            f"({target.describe()} vs {source.describe()}): use the importance method for width"
        )
    device = decoder_of(model).embed_tokens.weight.device
    pattern = adapter_for(model.config).layer_pattern(target.layers)
    if layers is not None:
        score = _keep_scores(layers, source, target, pattern).to(device)
    else:
        if batches is None:
            raise PruneError("depth pruning by block influence needs calibration batches (or a list of layers)")
        score = collect_importance(model, batches, want_width=False, want_depth=True)["layer"]
    return select(source, target, {"layer": score}, device=device, layer_pattern=pattern)


def _keep_scores(layers: list[int], source: PruneShape, target: PruneShape, pattern) -> torch.Tensor:
    """Scores that keep exactly `layers` (checked: in range, no duplicates, the target's count, and, where layer
    types alternate, each layer's type the one of its new position)."""
    keep = sorted(set(int(i) for i in layers))
    bad = [i for i in keep if not 0 <= i < source.layers]
    if bad:
        raise PruneError(f"layers to keep {bad} are out of range 0..{source.layers - 1}")
    if len(keep) != len(layers):
        raise PruneError(f"layers to keep {layers} contain duplicates")
    if len(keep) != target.layers:
        raise PruneError(f"{len(keep)} layers to keep, but the target has {target.layers} layers")
    if pattern is not None and [pattern[0][i] for i in keep] != pattern[1]:
        raise PruneError(
            f"layers to keep {keep}: their attention types {[pattern[0][i] for i in keep]} differ from the types "
            f"a {len(keep)}-layer model gives its positions {pattern[1]}"
        )
    score = torch.zeros(source.layers)
    score[keep] = 1.0
    return score


def random_masks(config, target: PruneShape, seed: int = 0) -> dict:
    """OpenBA-V2's random-selection baseline: the target structure with units chosen uniformly at random."""
    source = PruneShape.from_config(config)
    g = torch.Generator().manual_seed(int(seed))
    scores = {k: torch.rand(shape, generator=g) for k, shape in kind_shapes(source).items()}
    return select(source, target, scores, layer_pattern=adapter_for(config).layer_pattern(target.layers))


# ---------------------------------------------------------------------------------------------- calibration data
def calibration_texts(path) -> Iterable[str]:
    """Texts of a calibration file, read like every corpus (`colossal_shear.data.records.iter_texts`: a JSONL
    record's source + target, or blocks of plain-text lines); the bundled corpus when path is None."""
    from colossal_shear.bundled import corpus_files
    from colossal_shear.data.records import texts

    return texts(corpus_files() if path is None else [path])


def calibration_batches(
    tokenizer, path=None, num_samples: int = 512, length: int = 512, batch_size: int = 8
) -> list[dict]:
    """Calibration batches {input_ids, attention_mask} (right-padded): from a JSONL file (tokenised with `tokenizer`,
    cut to `length` tokens), a prepared dataset directory (its packed sequences, cut to `length`), or the bundled
    corpus when `path` is None."""
    if num_samples <= 0 or length <= 1 or batch_size <= 0:
        raise PruneError("num_calibration_samples, calibration_length (> 1) and batch size must be positive")
    seqs: list[list[int]] = []
    p = Path(os.path.expanduser(str(path))) if path is not None else None
    if p is not None and p.is_dir():
        from colossal_shear.data.prepared import open_prepared

        data = open_prepared([str(p)], tokenizer).dataset
        for row in data.select(range(min(num_samples, len(data)))):
            valid = int(sum(row["doc_lengths"])) if "doc_lengths" in row else len(row["input_ids"])
            seqs.append(list(row["input_ids"][: min(valid, length)]))
    else:
        if p is not None and not p.is_file():
            raise FileNotFoundError(f"--calibration_dataset {p}: no such file or directory")
        for text in calibration_texts(p):
            ids = tokenizer(text, add_special_tokens=True, truncation=False)["input_ids"][:length]
            if len(ids) > 1:
                seqs.append(ids)
            if len(seqs) >= num_samples:
                break
    seqs = [s for s in seqs if s]
    if not seqs:
        raise PruneError(f"no calibration sequences in {path or 'the bundled corpus'}")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    out = []
    for i in range(0, len(seqs), batch_size):
        chunk = seqs[i : i + batch_size]
        width = max(len(s) for s in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for r, s in enumerate(chunk):
            ids[r, : len(s)] = torch.tensor(s)
            mask[r, : len(s)] = 1
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


# ---------------------------------------------------------------------------------------------- the CLI's work
@dataclass
class OneShotReport:
    method: str
    output_dir: Path
    source: PruneShape
    target: PruneShape
    params_before: int
    params_after: int
    calibration_sequences: int = 0
    calibration_tokens: int = 0
    kept_layers: list[int] = field(default_factory=list)

    def format(self) -> str:
        rows = [("", "before", "after")]
        for name in ("hidden", "heads", "kv_heads", "layers", "intermediate"):
            rows.append((name, str(getattr(self.source, name)), str(getattr(self.target, name))))
        rows.append(("parameters", f"{self.params_before:,}", f"{self.params_after:,}"))
        rows.append(("", "", f"{self.params_after / self.params_before:.1%}"))
        w = [max(len(r[i]) for r in rows) for i in range(3)]
        lines = [f"pruned ({self.method}) -> {self.output_dir}"]
        if self.calibration_sequences:
            lines.append(f"calibration: {self.calibration_sequences} sequences, {self.calibration_tokens} tokens")
        lines.append(f"kept layers: {self.kept_layers}")
        for r in rows:
            lines.append(f"  {r[0]:<{w[0]}}  {r[1]:>{w[1]}}  {r[2]:>{w[2]}}")
        return "\n".join(lines)


def prune_oneshot(cfg: OneShotConfig) -> OneShotReport:
    """Load `cfg.pretrained`, choose masks with `cfg.method`, fold and write a plain HF model to `cfg.output_dir`."""
    from colossal_shear.pruning.fold import fold, save_folded

    src_dir, out = _check_options(cfg)
    config, source, target = _source_and_target(cfg, src_dir)
    model = _load_model(cfg, src_dir)
    batches, n_seq, n_tok = _calibration(cfg, src_dir)
    z = _choose_masks(cfg, model, config, batches, target)
    small = fold(model, z, target)
    save_folded(small, None, out, tokenizer_dir=src_dir, overwrite=cfg.overwrite)
    kept = torch.nonzero(z["layer"] != 0).flatten().tolist()
    return OneShotReport(
        cfg.method, out, source, target, model.num_parameters(), small.num_parameters(), n_seq, n_tok, kept
    )


def _check_options(cfg: OneShotConfig) -> tuple[Path, Path]:
    """The source and output directories, once the options are known to fit together."""
    if cfg.method not in METHODS:
        raise PruneError(f"--method must be one of {', '.join(METHODS)}, got {cfg.method!r}")
    src_dir = Path(os.path.expanduser(str(cfg.pretrained)))
    out = Path(os.path.expanduser(str(cfg.output_dir)))
    if not (src_dir / "config.json").is_file():
        raise FileNotFoundError(f"--pretrained {src_dir}: no config.json (a Hugging Face model directory is needed)")
    if out.resolve() == src_dir.resolve():
        raise PruneError("--output_dir must differ from --pretrained")
    if out.exists() and not cfg.overwrite and not (out.is_dir() and not any(out.iterdir())):
        raise FileExistsError(f"--output_dir {out} exists and is not empty (pass --overwrite)")
    if cfg.dtype is not None and cfg.dtype not in DTYPES:
        raise PruneError(f"--dtype must be one of {', '.join(DTYPES)}, got {cfg.dtype!r}")
    if cfg.keep_layers is not None and cfg.method != "depth":
        raise PruneError("--keep_layers is for --method depth")
    if cfg.match_params and (cfg.method != "depth" or cfg.keep_layers is not None):
        raise PruneError("--match_params is for --method depth with a --target_shape (not with --keep_layers)")
    return src_dir, out


def _source_and_target(cfg: OneShotConfig, src_dir: Path):
    """The source config, its shape and the target shape (checked against the source and the method)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(src_dir, trust_remote_code=False)
    adapter_for(config, f"--pretrained {src_dir}")  # an unsupported family: one line, before any calibration pass
    source = PruneShape.from_config(config)
    if cfg.target_shape:
        target = PruneShape.parse(cfg.target_shape, config)
    elif cfg.method == "depth" and cfg.keep_layers:
        target = PruneShape(source.hidden, source.heads, len(cfg.keep_layers), source.intermediate, source.kv_heads)
    else:
        raise PruneError("--target_shape is required (except for --method depth with --keep_layers)")
    target.validate_against(source)
    if cfg.method == "depth":
        narrower = [
            k for k in ("hidden", "heads", "kv_heads", "intermediate") if getattr(target, k) != getattr(source, k)
        ]
        if narrower and cfg.match_params and not cfg.keep_layers:
            tied = bool(getattr(config, "tie_word_embeddings", False))
            target = target.depth_of_same_size(source, config.vocab_size, head_dim_of(config), tied)
        elif narrower:
            raise PruneError(
                f"--method depth removes whole layers only; the target also shrinks "
                f"{', '.join(narrower)}: use --method importance, or --match_params for as many layers as give "
                "the target's parameter count"
            )
    return config, source, target


def _load_model(cfg: OneShotConfig, src_dir: Path) -> nn.Module:
    """The source model on --device (default: cuda when available), in eval mode; a decoder of a supported family."""
    from transformers import AutoModelForCausalLM

    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[cfg.dtype] if cfg.dtype else "auto"
    model = AutoModelForCausalLM.from_pretrained(
        src_dir, torch_dtype=dtype, use_safetensors=True, trust_remote_code=False
    ).to(device)
    decoder_of(model)  # ModelFamilyError (one line) when the stack is not where the family keeps it
    return model.eval()


def _calibration(cfg: OneShotConfig, src_dir: Path) -> tuple[list[dict] | None, int, int]:
    """The calibration batches, their sequences and real tokens, for the methods that score on data."""
    if not (cfg.method == "importance" or (cfg.method == "depth" and cfg.keep_layers is None)):
        return None, 0, 0
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(src_dir, trust_remote_code=False)
    batches = calibration_batches(
        tokenizer,
        cfg.calibration_dataset,
        cfg.num_calibration_samples,
        cfg.calibration_length,
        cfg.calibration_batch_size,
    )
    n_seq = sum(len(b["input_ids"]) for b in batches)
    n_tok = int(sum(int(b["attention_mask"].sum()) for b in batches))
    return batches, n_seq, n_tok


def _choose_masks(cfg: OneShotConfig, model: nn.Module, config, batches, target: PruneShape) -> dict:
    if cfg.method == "importance":
        return importance_masks(model, batches, target)
    if cfg.method == "depth":
        return depth_masks(model, batches, target, cfg.keep_layers)
    return random_masks(config, target, cfg.seed)

"""Resizing a causal LM's input embeddings and LM head to a new tokenizer (the library side of init_model.py).

Rows are matched through `id_map.json` (written by init_tokenizer.py; old id -> new id) or, for a tokenizer made
elsewhere, by piece string. Kept rows are copied bit for bit; every other row of the new vocabulary is initialised:
- `subtoken_mean` (default): the mean of the source rows of the pieces the *source* tokenizer splits the new piece
  into (the piece's own string through the source BPE, so no dummy prefix or special token sneaks in); input
  embeddings and an untied LM head each from their own rows;
- `mean`: the mean of all source rows; `normal`: per-dimension mean and std of the source rows (seeded).
Rows past the tokenizer up to a multiple of `pad_to_multiple_of` get the mean (config.vocab_size is the padded size;
the tokenizer keeps its length).

Everything is vectorised: each matrix is allocated once, kept rows are copied with one indexed copy, new rows are
computed in chunks with `embedding_bag` / `index_add_` (no per-token concatenation, which copies the whole matrix
once per new token: O(V^2)). The model is loaded once, on the CPU, in the dtype its weights are stored in (the
config's `torch_dtype` is only a fallback, so a mislabelled fp32 checkpoint is not silently loaded in fp16); the
output keeps that dtype unless `--dtype` asks for another one, and a lossy conversion needs `allow_downcast`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from colossal_shear.core.constants import DTYPES, ID_MAP_FILE
from colossal_shear.core.fsutil import atomic_dir, check_target, copy_tokenizer_files
from colossal_shear.core.logger import get_logger
from colossal_shear.models.registry import adapter_for
from colossal_shear.vocab.config import INITS, ResizeConfig, ResizeError
from colossal_shear.vocab.id_map import read_id_map

log = get_logger(__name__)

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
CHUNK_ROWS = 8192


# ---------------------------------------------------------------------------------------------------------------
# Row plans and the vectorised matrix build (also used by bench/resize.py)
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class RowPlan:
    """Where each row of the new matrix comes from.

    `copy_dst[i]` takes source row `copy_src[i]`; `new_ids` are initialised (for `subtoken_mean` from source rows
    `sub_flat[sub_offsets[j]:sub_offsets[j] + sub_lengths[j]]`); rows `tokenizer_size..padded_size-1` are padding.
    `source_rows` are the source rows that belong to real tokens (the statistics for mean / normal use them)."""

    tokenizer_size: int
    padded_size: int
    copy_dst: torch.Tensor
    copy_src: torch.Tensor
    new_ids: torch.Tensor
    sub_flat: torch.Tensor
    sub_lengths: torch.Tensor
    source_rows: int
    id_map: dict[int, int] = field(default_factory=dict)

    @property
    def sub_offsets(self) -> torch.Tensor:
        return torch.cumsum(self.sub_lengths, 0) - self.sub_lengths

    @property
    def padding(self) -> int:
        return self.padded_size - self.tokenizer_size


def padded(n: int, multiple: int) -> int:
    return n if multiple <= 1 else -(-n // multiple) * multiple


def make_plan(
    id_map: dict[int, int],
    tokenizer_size: int,
    sub_ids: dict[int, list[int]],
    source_rows: int,
    pad_to_multiple_of: int,
) -> RowPlan:
    """A plan from old->new ids and, for each new id, the source ids of its sub-pieces."""
    olds = sorted(id_map)
    new_ids = sorted(set(range(tokenizer_size)) - set(id_map.values()))
    lengths = [len(sub_ids.get(i, ())) for i in new_ids]
    flat = [s for i in new_ids for s in sub_ids.get(i, ())]
    return RowPlan(
        tokenizer_size=tokenizer_size,
        padded_size=padded(tokenizer_size, pad_to_multiple_of),
        copy_dst=torch.tensor([id_map[o] for o in olds], dtype=torch.long),
        copy_src=torch.tensor(olds, dtype=torch.long),
        new_ids=torch.tensor(new_ids, dtype=torch.long),
        sub_flat=torch.tensor(flat, dtype=torch.long),
        sub_lengths=torch.tensor(lengths, dtype=torch.long),
        source_rows=source_rows,
        id_map=dict(id_map),
    )


def _row_stats(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and std in float32, in chunks (no full float32 copy of a half-precision matrix)."""
    n, h = rows.shape
    s = torch.zeros(h, dtype=torch.float64)
    s2 = torch.zeros(h, dtype=torch.float64)
    for start in range(0, n, CHUNK_ROWS):
        block = rows[start : start + CHUNK_ROWS].to(torch.float64)
        s += block.sum(0)
        s2 += (block * block).sum(0)
    mean = s / max(n, 1)
    var = (s2 / max(n, 1) - mean * mean).clamp_min(0)
    return mean.float(), var.sqrt().float()


def _subtoken_means(old: torch.Tensor, plan: RowPlan, start: int, stop: int, fallback: torch.Tensor) -> torch.Tensor:
    """Means (float32) of the sub-piece rows of new rows start..stop-1, all at once."""
    lengths = plan.sub_lengths[start:stop]
    offsets = plan.sub_offsets[start:stop]
    lo = int(offsets[0]) if len(offsets) else 0
    hi = int(offsets[-1] + lengths[-1]) if len(offsets) else 0
    flat = plan.sub_flat[lo:hi]
    if old.dtype in (torch.float32, torch.float64):
        out = torch.nn.functional.embedding_bag(flat, old, offsets - lo, mode="mean").float()
    else:
        seg = torch.repeat_interleave(torch.arange(stop - start), lengths)
        out = torch.zeros(stop - start, old.shape[1], dtype=torch.float32)
        out.index_add_(0, seg, old.index_select(0, flat).float())
        out /= lengths.clamp_min(1).unsqueeze(1).float()
    empty = lengths == 0
    if bool(empty.any()):
        out[empty] = fallback
    return out


def resize_matrix(
    old: torch.Tensor, plan: RowPlan, init: str = "subtoken_mean", generator: torch.Generator | None = None
) -> torch.Tensor:
    """The new (padded_size x hidden) matrix: one allocation, one indexed copy of kept rows, new rows vectorised."""
    if init not in INITS:
        raise ResizeError(f"unknown init {init!r}")
    h = old.shape[1]
    out = torch.empty(plan.padded_size, h, dtype=old.dtype)
    n_copy = len(plan.copy_dst)
    if n_copy:
        ident = bool(torch.equal(plan.copy_dst, plan.copy_src)) and bool(
            torch.equal(plan.copy_dst, torch.arange(n_copy))
        )
        if ident:  # expansion: the old block stays where it is
            out[:n_copy].copy_(old[:n_copy])
        else:
            out.index_copy_(0, plan.copy_dst, old.index_select(0, plan.copy_src))
    real = old[: plan.source_rows]
    if init == "normal":
        mean, std = _row_stats(real)
    else:  # one reduction, accumulated in float32 without a float32 copy of a half-precision matrix
        mean = real.mean(0, dtype=torch.float32) if len(real) else torch.zeros(h)
    n_new = len(plan.new_ids)
    for start in range(0, n_new, CHUNK_ROWS):
        stop = min(n_new, start + CHUNK_ROWS)
        ids = plan.new_ids[start:stop]
        if init == "subtoken_mean":
            rows = _subtoken_means(old, plan, start, stop, mean)
        elif init == "mean":
            rows = mean.expand(stop - start, h)
        else:
            rows = mean + std * torch.randn(stop - start, h, generator=generator)
        out.index_copy_(0, ids, rows.to(old.dtype))
    if plan.padding:
        out[plan.tokenizer_size :] = mean.to(old.dtype)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Tokenizers -> plan
# ---------------------------------------------------------------------------------------------------------------


def _load_tokenizer(path: Path, what: str):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path)
    except Exception as e:
        raise ResizeError(f"{what} {path} has no loadable tokenizer: {e}") from None
    if not tok.is_fast:
        raise ResizeError(
            f"{what} {path}: a fast tokenizer (tokenizer.json, or a tokenizer.model that converts) is needed"
        )
    return tok


def _tokens(tok) -> list[str]:
    return tok.convert_ids_to_tokens(list(range(len(tok))))


def map_ids(src_tok, tgt_tok, target_tokenizer_path: Path, source_rows: int) -> dict[int, int]:
    """old id -> new id: from id_map.json (checked against both vocabularies), else by piece string."""
    src_tokens, tgt_tokens = _tokens(src_tok), _tokens(tgt_tok)
    path = Path(target_tokenizer_path) / ID_MAP_FILE
    if path.exists():
        id_map = read_id_map(path)
        for old, new in id_map.items():
            if old >= len(src_tokens) or new >= len(tgt_tokens):
                raise ResizeError(
                    f"{path}: maps {old} -> {new}, outside the tokenizers ({len(src_tokens)} -> "
                    f"{len(tgt_tokens)} tokens); was the tokenizer made from this source?"
                )
            if src_tokens[old] != tgt_tokens[new]:
                raise ResizeError(
                    f"{path}: source id {old} is {src_tokens[old]!r} but target id {new} is "
                    f"{tgt_tokens[new]!r}; was the tokenizer made from this source?"
                )
    else:
        where = {t: i for i, t in enumerate(src_tokens)}
        id_map = {where[t]: i for i, t in enumerate(tgt_tokens) if t in where}
    bad = [o for o in id_map if o >= source_rows]
    if bad:
        raise ResizeError(f"source token id {bad[0]} has no embedding row (the model has {source_rows} rows)")
    return id_map


def subtoken_ids(src_tok, tgt_tok, new_ids: list[int], source_rows: int) -> dict[int, list[int]]:
    """For each new target id, the source ids the source BPE splits its piece string into (no normalisation, no
    dummy prefix, no special tokens: the piece as the model sees it)."""
    model = src_tok.backend_tokenizer.model
    pieces = tgt_tok.convert_ids_to_tokens(new_ids)
    out = {}
    for i, piece in zip(new_ids, pieces):
        ids = [t.id for t in model.tokenize(piece)] if piece else []
        out[i] = [j for j in ids if j is not None and 0 <= j < source_rows]
    return out


# ---------------------------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------------------------


def stored_dtype(model_dir: Path) -> torch.dtype | None:
    """The floating dtype most of the stored weights have (safetensors headers only; nothing is loaded)."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        return None
    from safetensors import safe_open

    counts: dict[torch.dtype, int] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():
                dt = SAFETENSORS_DTYPES.get(st.get_slice(k).get_dtype())
                if dt is not None:
                    counts[dt] = counts.get(dt, 0) + 1
    return max(counts, key=counts.get) if counts else None


def _config_dtype(config) -> torch.dtype | None:
    dt = getattr(config, "torch_dtype", None)
    if isinstance(dt, str):
        return DTYPES.get(dt)
    return dt if isinstance(dt, torch.dtype) else None


def is_downcast(src: torch.dtype, dst: torch.dtype) -> bool:
    """Lossy: fewer bits, or between the two 16-bit formats (each loses what the other keeps)."""
    if src == dst:
        return False
    return dst.itemsize < src.itemsize or dst.itemsize == src.itemsize


def _remap_token_id(value, id_map: dict[int, int], what: str):
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        return [_remap_token_id(v, id_map, what) for v in value]
    if value not in id_map:
        raise ResizeError(f"the source {what} ({value}) is not in the new vocabulary")
    return id_map[value]


@dataclass
class ResizeReport:
    source_rows: int
    target_rows: int
    tokenizer_size: int
    copied: int
    initialised: int
    padding: int
    init: str
    dtype: str
    tied: bool
    notes: list[str] = field(default_factory=list)
    calibration: dict | None = None  # CalibrationReport fields (--init calibrated)

    def format(self) -> str:
        lines = [
            f"Embedding resize: {self.source_rows:,} -> {self.target_rows:,} rows "
            f"(tokenizer {self.tokenizer_size:,}, padding {self.padding:,})",
            f"  copied {self.copied:,} rows, initialised {self.initialised:,} ({self.init}), "
            f"dtype {self.dtype}, {'tied' if self.tied else 'untied'} LM head",
        ]
        if self.calibration:
            from colossal_shear.vocab.calibration import CalibrationReport

            lines += CalibrationReport(**self.calibration).lines()
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def resize_model(cfg: ResizeConfig) -> ResizeReport:
    """Load the source model once (CPU, its own dtype), resize embeddings and LM head to the target tokenizer,
    update config / generation config ids, and save model + tokenizer files atomically to the target path."""
    from transformers import AutoConfig

    src, tgt_tok_dir, target = _check_paths(cfg)
    src_tok = _load_tokenizer(src, "source")
    tgt_tok = _load_tokenizer(tgt_tok_dir, "target tokenizer")
    notes: list[str] = []
    config = AutoConfig.from_pretrained(src)
    adapter_for(config, str(src))  # an unsupported family: one line, before the model is loaded
    src_dtype, out_dtype = _plan_dtypes(cfg, src, config, notes)
    model, tied = _load_model(src, src_dtype)
    source_rows = model.get_input_embeddings().weight.shape[0]
    plan = _plan_rows(cfg, src_tok, tgt_tok, tgt_tok_dir, source_rows)
    src_in, src_out = _source_matrices(model)  # before the resize replaces them: calibrated init reads them
    _resize_rows(model, plan, cfg, tied)
    tied = _untie_if_asked(model, cfg, tied, notes)
    calibration = _calibrate_if_asked(model, tgt_tok, plan, src_in, src_out, cfg, tied, notes)
    del src_in, src_out
    _remap_special_ids(model, plan.id_map, tgt_tok)
    if out_dtype != src_dtype:
        model = model.to(out_dtype)
    model.config.torch_dtype = out_dtype
    report = ResizeReport(
        source_rows=source_rows,
        target_rows=plan.padded_size,
        tokenizer_size=len(tgt_tok),
        copied=len(plan.copy_dst),
        initialised=len(plan.new_ids),
        padding=plan.padding,
        init=cfg.init,
        dtype=str(out_dtype).replace("torch.", ""),
        tied=tied,
        notes=notes,
        calibration=calibration,
    )
    _save(model, plan, report, cfg, tgt_tok_dir, target)
    return report


def _check_paths(cfg: ResizeConfig) -> tuple[Path, Path, Path]:
    """The source model, target tokenizer and target model paths, checked before anything is loaded."""
    cfg.validate()
    src = Path(cfg.source_model_and_tokenizer_path)
    tgt_tok_dir = Path(cfg.target_tokenizer_path)
    target = Path(cfg.target_model_path)
    if not (src / "config.json").exists():
        raise ResizeError(f"no model in {src} (config.json not found)")
    if not tgt_tok_dir.is_dir():
        raise ResizeError(f"target tokenizer directory not found: {tgt_tok_dir}")
    check_target(target, cfg.overwrite, sources=(src, tgt_tok_dir), error=ResizeError)
    return src, tgt_tok_dir, target


def _plan_dtypes(cfg: ResizeConfig, src: Path, config, notes: list[str]) -> tuple[torch.dtype, torch.dtype]:
    """The dtype to load in (the stored weights'; config.json's only as a fallback) and the one to save in
    (`--dtype`, a lossy conversion only with `--allow_downcast`)."""
    weights_dtype = stored_dtype(src)
    cfg_dtype = _config_dtype(config)
    src_dtype = weights_dtype or cfg_dtype or torch.float32
    if weights_dtype is not None and cfg_dtype is not None and weights_dtype != cfg_dtype:
        notes.append(
            f"config.json says {cfg_dtype} but the weights are stored as {weights_dtype}: using {weights_dtype}"
        )
    if weights_dtype is None and cfg_dtype is None:
        notes.append("no dtype in config.json or safetensors headers: loading as float32")
    out_dtype = DTYPES[cfg.dtype] if cfg.dtype else src_dtype
    if is_downcast(src_dtype, out_dtype):
        if not cfg.allow_downcast:
            raise ResizeError(
                f"--dtype {cfg.dtype} would convert the {src_dtype} source to {out_dtype} and lose "
                "precision; pass --allow_downcast to do it anyway"
            )
        notes.append(f"converting {src_dtype} -> {out_dtype} as asked (--dtype {cfg.dtype} --allow_downcast)")
    return src_dtype, out_dtype


def _load_model(src: Path, dtype: torch.dtype):
    """The source model (CPU, eval mode) and whether its LM head shares the input embeddings."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, torch_dtype=dtype, low_cpu_mem_usage=True)
    model.eval()
    emb = model.get_input_embeddings()
    head = model.get_output_embeddings()
    if head is not None and getattr(head, "bias", None) is not None:
        raise ResizeError("LM heads with a bias are not supported")
    return model, head is not None and head.weight is emb.weight


def _plan_rows(cfg: ResizeConfig, src_tok, tgt_tok, tgt_tok_dir: Path, source_rows: int) -> RowPlan:
    """Where each row of the new matrices comes from: kept rows by id map, new rows from their sub-pieces."""
    id_map = map_ids(src_tok, tgt_tok, tgt_tok_dir, source_rows)
    new_ids = sorted(set(range(len(tgt_tok))) - set(id_map.values()))
    subs = subtoken_ids(src_tok, tgt_tok, new_ids, source_rows) if cfg.init in ("subtoken_mean", "calibrated") else {}
    real_rows = min(source_rows, len(src_tok))
    return make_plan(id_map, len(tgt_tok), subs, real_rows, cfg.pad_to_multiple_of)


def _source_matrices(model) -> tuple[torch.Tensor, torch.Tensor]:
    """The source model's input and output matrices (the same tensor when tied)."""
    emb = model.get_input_embeddings()
    head = model.get_output_embeddings()
    return emb.weight.data, (head if head is not None else emb).weight.data


def _resize_rows(model, plan: RowPlan, cfg: ResizeConfig, tied: bool) -> None:
    """New input embeddings and LM head (tied: the one shared matrix) of the plan's padded size; the new rows
    initialised by `cfg.init` (calibrated: by sub-token mean, which the calibration starts from)."""
    emb = model.get_input_embeddings()
    head = model.get_output_embeddings()
    gen = torch.Generator().manual_seed(cfg.seed)
    row_init = "subtoken_mean" if cfg.init == "calibrated" else cfg.init
    with torch.no_grad():
        new_emb = resize_matrix(emb.weight.data, plan, row_init, gen)
        emb.weight = torch.nn.Parameter(new_emb, requires_grad=emb.weight.requires_grad)
        emb.num_embeddings = plan.padded_size
        if emb.padding_idx is not None:
            emb.padding_idx = plan.id_map.get(emb.padding_idx)
        if head is not None:
            if tied:
                model.tie_weights()
            else:
                new_head = resize_matrix(head.weight.data, plan, row_init, gen)
                head.weight = torch.nn.Parameter(new_head, requires_grad=head.weight.requires_grad)
            head.out_features = plan.padded_size
    model.config.vocab_size = plan.padded_size


def _untie_if_asked(model, cfg: ResizeConfig, tied: bool, notes: list[str]) -> bool:
    """`--untie_embeddings` on a tied model: the LM head becomes its own matrix. Returns whether it is still tied."""
    if not (cfg.untie_embeddings and tied):
        return tied
    from colossal_shear.vocab.calibration import untie

    untie(model)
    notes.append("untied: the LM head is now its own matrix (--untie_embeddings)")
    return False


def _calibrate_if_asked(model, tgt_tok, plan, src_in, src_out, cfg: ResizeConfig, tied: bool, notes) -> dict | None:
    """`--init calibrated`: the new rows fitted on the calibration text; returns the CalibrationReport's fields."""
    if cfg.init != "calibrated":
        return None
    from colossal_shear.vocab.calibration import calibrate_new_rows, check_supported

    note = check_supported(model)
    if note:
        notes.append(note)
    calibration = calibrate_new_rows(model, tgt_tok, plan, src_out, cfg.calibration(), tied, src_in).__dict__
    notes.append(
        "tied: the calibrated rows are shared by the input embeddings and the LM head "
        "(--untie_embeddings gives the head its own rows)"
        if tied
        else "untied: calibrated LM-head rows; input rows as the calibration chose"
    )
    return calibration


def _remap_special_ids(model, id_map: dict[int, int], tgt_tok) -> None:
    """bos / eos / pad ids of the config and generation config to their new ids (pad: the tokenizer's if unset)."""
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        for obj in (model.config, getattr(model, "generation_config", None)):
            if obj is not None and getattr(obj, name, None) is not None:
                setattr(obj, name, _remap_token_id(getattr(obj, name), id_map, name))
    if model.config.pad_token_id is None and tgt_tok.pad_token_id is not None:
        model.config.pad_token_id = tgt_tok.pad_token_id


def _save(model, plan: RowPlan, report: ResizeReport, cfg: ResizeConfig, tgt_tok_dir: Path, target: Path) -> None:
    """Model, tokenizer files, new_rows.json and resize_report.json, written to a temporary sibling and renamed."""
    from colossal_shear.vocab.rows import write_new_rows

    with atomic_dir(target, cfg.overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True, max_shard_size=cfg.max_shard_size)
        copy_tokenizer_files(tgt_tok_dir, tmp)
        write_new_rows(tmp, plan, cfg.init)
        (tmp / "resize_report.json").write_text(json.dumps(dict(report.__dict__), indent=2), encoding="utf-8")

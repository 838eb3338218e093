"""What a checkpoint was trained from, and what resuming it may change.

Every checkpoint's manifest records the run's origin:

    model      the config.json of the model as built, and a fingerprint of the weights it started from
    tokenizer  the tokenizer's hash (data.manifest.tokenizer_fingerprint)
    dataset    data.manifest.dataset_fingerprint: the datasets' manifests (seed included), parts in order, and a
               sampled fingerprint of their Arrow files (the sequences and their order)
    settings   the options that shape the run and that a checkpoint cannot follow once they change (FIXED)
    schedule   the options a resume may change (lr, run length, batch, accumulation): applied with a notice, the
               learning rate continuing from where it was (optim.WarmupCosine.resume)

`mismatch` compares a checkpoint's origin with this run's and names the first difference in one line; the checkpoint
manager refuses a mismatch on every rank before any collective load. Checkpoints written before origins were
recorded resume as before (nothing to compare).
"""

from __future__ import annotations

import json
from pathlib import Path

from colossal_shear.core.fsutil import sampled_fingerprint
from colossal_shear.data.manifest import tokenizer_fingerprint

# options that must be the same to resume: changing them would silently not apply (the optimizer's and sampler's
# states carry the old value) or would not fit the checkpoint's states
FIXED = (
    "stage",
    "seed",
    "model.train_embeddings",
    "parallel.mixed_precision",
    "optim.weight_decay",
    "optim.warmup_steps",
    "data.dynamic_loading",
    "data.reference_loss",
    "prune.target_shape",
    "prune.lag_lr",
    "prune.mask_lr",
    "prune.mask_init",
    "prune.mask_init_from",
    "prune.mask_init_spread",
    "prune.lagrangian_warmup_steps",
    "distill.kd_weight",
    "distill.kd_temperature",
    "distill.lm_weight",
)
# fields of config.json that say where or how it was saved, not what the model is
NOT_THE_MODEL = ("_name_or_path", "transformers_version", "torch_dtype", "use_cache", "_attn_implementation_autoset")
WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt", "*.index.json")


def weights_fingerprint(model_dir) -> str | None:
    """A sampled fingerprint of a Hugging Face model directory's weight files (None without a directory)."""
    if not model_dir:
        return None
    root = Path(model_dir)
    return sampled_fingerprint(root, sorted({p for pattern in WEIGHT_FILES for p in root.glob(pattern)}))


def model_config_dict(config) -> dict:
    return {k: v for k, v in json.loads(config.to_json_string(use_diff=False)).items() if k not in NOT_THE_MODEL}


def _get(cfg, dotted: str):
    value = cfg
    for name in dotted.split("."):
        value = getattr(value, name)
    return value


def run_origin(cfg, inputs, schedule: dict) -> dict:
    """This run's origin (the same on every rank: computed from the same files and flags)."""
    settings = {name: _get(cfg, name) for name in FIXED}
    distill = cfg.distill
    settings["distill.teacher"] = distill.teacher if distill.from_parent else weights_fingerprint(distill.teacher)
    settings["data.reference_model"] = weights_fingerprint(cfg.data.reference_model)
    if cfg.stage == "prune":  # the masks' target ramp and schedule are laid over the run's length
        settings["optim.max_steps"] = schedule["max_steps"]
    return {
        "model": {
            "path": str(inputs.model_path),
            "config": model_config_dict(inputs.model_config),
            "weights": weights_fingerprint(inputs.model_path),
        },
        "tokenizer": tokenizer_fingerprint(inputs.tokenizer)["hash"],
        "dataset": inputs.data.fingerprint,
        "settings": settings,
        "schedule": schedule,
    }


def _flag(name: str) -> str:
    return "--" + name.split(".")[-1]


def _short(value) -> str:
    return value[:12] if isinstance(value, str) and len(value) == 64 else repr(value) if value is None else str(value)


def mismatch(saved: dict | None, mine: dict, where) -> str | None:
    """One line naming what differs between checkpoint `where`'s origin and this run's, or None."""
    if not saved:
        return None
    model, old = mine["model"], saved["model"]
    ours = f"in checkpoint {where}"
    keys = [k for k in {**old["config"], **model["config"]} if old["config"].get(k) != model["config"].get(k)]
    if keys:
        diffs = ", ".join(f"{k} {model['config'].get(k)} != {old['config'].get(k)}" for k in keys[:3])
        return f"--pretrained {model['path']}: {diffs} {ours} (trained from {old['path']})"
    if old["weights"] != model["weights"]:
        return (
            f"--pretrained {model['path']}: other weights than the ones {where} started from ({old['path']}; "
            f"fingerprint {_short(model['weights'])} != {_short(old['weights'])})"
        )
    if saved["tokenizer"] != mine["tokenizer"]:
        theirs = _short(saved["tokenizer"])
        return f"--pretrained {model['path']}: tokenizer hash {_short(mine['tokenizer'])} != {theirs} {ours}"
    data, old_data = mine["dataset"], saved["dataset"]
    if data["hash"] != old_data["hash"]:
        what = (
            f"prepared with seed {data['seeds']} != {old_data['seeds']}"
            if data["seeds"] != old_data["seeds"]
            else f"parts {data['parts']} != {old_data['parts']}"
            if data["parts"] != old_data["parts"]
            else f"fingerprint {_short(data['hash'])} != {_short(old_data['hash'])}"
        )
        return f"--dataset: {what} {ours}: other sequences, or another order, than the run trained on"
    for name, value in mine["settings"].items():
        if name in saved["settings"] and saved["settings"][name] != value:
            return f"{_flag(name)} {_short(value)} != {_short(saved['settings'][name])} {ours}: resume with its value"
    return None


def schedule_changes(saved: dict | None, mine: dict) -> list[str]:
    """The schedule options a resume changes, as '--lr 0.001 -> 0.002' (empty: none, or no record)."""
    if not saved or "schedule" not in saved:
        return []
    old = saved["schedule"]
    return [f"{_flag(k)} {old[k]} -> {v}" for k, v in mine["schedule"].items() if k in old and old[k] != v]

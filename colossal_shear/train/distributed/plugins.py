"""Booster plugin factory: one place that turns `--plugin` and its parallel flags into a ColossalAI plugin.

CPU processes (gloo) run `ddp`, `zero2`, `zero2_cpu` and `3d` thanks to colossal_shear.compat; `gemini` and
`gemini_auto` need a CUDA/NPU device and are refused before any work starts.
"""

from __future__ import annotations

import torch

from colossal_shear.core.constants import DTYPES, PRECISIONS
from colossal_shear.core.errors import UserError
from colossal_shear.train.config import PLUGINS, ParallelConfig

CUDA_ONLY = {
    "gemini": "Gemini's chunk manager keeps parameters in CUDA/NPU memory chunks and asserts a cuda or npu device",
    "gemini_auto": "Gemini's chunk manager keeps parameters in CUDA/NPU memory chunks and asserts a cuda or npu device",
}


class PluginError(UserError, ValueError):
    """A plugin/parallel configuration that cannot run here; raised before any training work."""


def device_type() -> str:
    """What colossalai's accelerator auto-detection will pick, known before launching (no process group needed)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_parallel_config(cfg: ParallelConfig, world_size: int | None = None, model_config=None) -> None:
    """Refuse configurations that cannot work, with the reason, before distributed start-up or model loading."""
    if cfg.plugin not in PLUGINS:
        raise PluginError(f"--plugin {cfg.plugin!r} is not one of {', '.join(PLUGINS)}")
    if cfg.mixed_precision not in PRECISIONS:
        raise PluginError(f"--mixed_precision {cfg.mixed_precision!r} is not one of {', '.join(PRECISIONS)}")
    if cfg.plugin in CUDA_ONLY and device_type() == "cpu":
        raise PluginError(
            f"--plugin {cfg.plugin} cannot run on this CPU-only machine: {CUDA_ONLY[cfg.plugin]}. "
            "Use zero2, zero2_cpu, 3d or ddp on CPU processes."
        )
    if cfg.plugin.startswith("gemini") and cfg.mixed_precision == "fp32":
        raise PluginError(f"--plugin {cfg.plugin} supports only fp16 and bf16 (--mixed_precision)")
    for name in ("tp", "pp", "sp", "microbatch_size"):
        if getattr(cfg, name) < 1:
            raise PluginError(f"--{name} must be at least 1, got {getattr(cfg, name)}")
    if cfg.plugin != "3d" and (cfg.tp > 1 or cfg.pp > 1 or cfg.sp > 1):
        raise PluginError(f"--tp/--pp/--sp need --plugin 3d (got --plugin {cfg.plugin})")
    if cfg.zero_stage not in (0, 1, 2):
        raise PluginError(f"--zero_stage must be 0, 1 or 2, got {cfg.zero_stage}")
    if cfg.pp > 1 and cfg.zero_stage == 2:
        raise PluginError("--zero_stage 2 cannot be combined with --pp > 1 (ColossalAI supports ZeRO-1 with pipelines)")
    if world_size is not None and world_size % (cfg.tp * cfg.pp * cfg.sp) != 0:
        raise PluginError(f"world size {world_size} is not divisible by tp*pp*sp = {cfg.tp * cfg.pp * cfg.sp}")
    if model_config is not None:
        heads = model_config.num_attention_heads
        kv = getattr(model_config, "num_key_value_heads", None) or heads
        if heads % cfg.tp or kv % cfg.tp:
            raise PluginError(
                f"--tp {cfg.tp} must divide the attention heads ({heads}) and key/value heads ({kv}) of the model"
            )
        if cfg.pp > model_config.num_hidden_layers:
            raise PluginError(f"--pp {cfg.pp} is larger than the model's {model_config.num_hidden_layers} layers")
        if cfg.plugin == "3d":
            check_shardformer_policy(model_config)


def check_shardformer_policy(model_config) -> None:
    """`3d` runs the model through colossalai's shardformer, which needs a policy for its class: refuse a model
    without one (Gemma, Phi-3, Qwen3... in colossalai 0.5.0), naming the plugins that train it, instead of a
    traceback on every rank after the process group started. Models whose class transformers does not know (remote
    code) are left to colossalai."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    from colossal_shear.core import compat  # noqa: F401  (quiets colossalai's import noise)

    from colossalai.shardformer.policies.auto_policy import _POLICY_LIST  # isort: skip

    model_class = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(model_config), None)
    if model_class is None or f"{model_class.__module__}.{model_class.__qualname__}" in _POLICY_LIST:
        return
    usable = [p for p in PLUGINS if p != "3d" and not (p in CUDA_ONLY and device_type() == "cpu")]
    raise PluginError(
        f"--plugin 3d cannot shard a {model_class.__name__} (model_type {model_config.model_type}): colossalai's "
        f"shardformer has no policy for it; use --plugin {', '.join(usable)}"
    )


def make_plugin(cfg: ParallelConfig, max_norm: float = 1.0):
    """Build the plugin. Call after `colossalai.launch_from_torch` (plugins read the process group)."""
    from colossalai.booster.plugin import GeminiPlugin, HybridParallelPlugin, LowLevelZeroPlugin, TorchDDPPlugin

    from colossal_shear.core import compat

    compat.install()
    check_parallel_config(cfg, world_size=torch.distributed.get_world_size())
    on_cpu = device_type() == "cpu"
    precision = cfg.mixed_precision
    if cfg.plugin == "ddp":
        return TorchDDPPlugin(find_unused_parameters=False)
    if cfg.plugin in ("zero2", "zero2_cpu"):
        return LowLevelZeroPlugin(
            stage=2,
            precision=precision,
            max_norm=max_norm,
            initial_scale=2**16,
            cpu_offload=cfg.plugin == "zero2_cpu" or cfg.zero_cpu_offload,
            overlap_communication=not on_cpu,  # record_stream needs real streams
        )
    if cfg.plugin.startswith("gemini"):
        return GeminiPlugin(
            placement_policy="auto" if cfg.plugin == "gemini_auto" else "static",
            precision=precision,
            max_norm=max_norm,
            initial_scale=2**16,
            offload_optim_frac=1.0 if cfg.zero_cpu_offload else 0.0,
        )
    extra = {"microbatch_size": cfg.microbatch_size} if cfg.pp > 1 else {}
    return HybridParallelPlugin(
        tp_size=cfg.tp,
        pp_size=cfg.pp,
        sp_size=cfg.sp if cfg.sp > 1 else None,
        enable_sequence_parallelism=cfg.sp > 1,
        sequence_parallelism_mode="all_to_all" if cfg.sp > 1 else None,
        zero_stage=cfg.zero_stage,
        precision=precision,
        max_norm=max_norm,
        initial_scale=2**16,
        cpu_offload=cfg.zero_cpu_offload,
        enable_fused_normalization=not on_cpu,
        overlap_communication=not on_cpu,
        overlap_p2p=not on_cpu,
        **extra,
    )


def model_dtype(cfg: ParallelConfig) -> torch.dtype:
    """The dtype the model's weights are held in: ddp keeps fp32 master weights (bf16 runs under autocast); the
    other plugins cast to their precision themselves."""
    return torch.float32 if cfg.plugin == "ddp" else DTYPES[cfg.mixed_precision]


def booster_kwargs(cfg: ParallelConfig) -> dict:
    """ddp's fp16 needs the Booster's loss scaling; the other plugins handle precision inside."""
    return {"mixed_precision": "fp16"} if cfg.plugin == "ddp" and cfg.mixed_precision == "fp16" else {}

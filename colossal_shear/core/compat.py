"""What colossalai 0.5.0 leaves unimplemented for CPU processes and for torch newer than the 2.5.1 it pins.

Every workaround is a small function registered in `PATCHES`, applied in memory by `install()` (idempotent; no file
of colossalai is changed on disk). Each one names the failure it fixes and has a test in tests/test_compat.py that
shows colossalai failing without it. When colossalai fixes one, its test says so and the patch can go.

Run `python -m colossal_shear.core.compat --report` to see the versions and what was applied.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import pickle
import re
import sys
import types
import warnings
from collections.abc import Callable

import torch

PATCHES: dict[str, Callable[[], bool]] = {}
_applied: list[str] = []


def _patch(fn: Callable[[], bool]) -> Callable[[], bool]:
    PATCHES[fn.__name__] = fn
    return fn


@_patch
def hccl_probe() -> bool:
    """Pipeline parallelism: colossalai.pipeline.p2p calls `torch.distributed.is_hccl_available`, gone in torch 2.6+."""
    if hasattr(torch.distributed, "is_hccl_available"):
        return False
    torch.distributed.is_hccl_available = lambda: False
    return True


def _cpu_accelerator():
    from colossalai.accelerator.cpu_accelerator import CpuAccelerator

    return CpuAccelerator


@_patch
def cpu_rng() -> bool:
    """Tensor parallelism and seeding: CpuAccelerator passes `device` to `torch.get_rng_state()` (which takes none)
    and refuses manual_seed/seed/... with "not supported for cpu accelerator"."""
    acc = _cpu_accelerator()
    acc.get_rng_state = lambda self, device=None: torch.get_rng_state()
    acc.get_rng_state_all = lambda self: [torch.get_rng_state()]
    acc.set_rng_state = lambda self, new_state, device=None: torch.set_rng_state(new_state)
    acc.set_rng_state_all = lambda self, states: torch.set_rng_state(states[0])
    acc.manual_seed = lambda self, seed: torch.manual_seed(seed)
    acc.manual_seed_all = lambda self, seed: torch.manual_seed(seed)
    acc.seed = lambda self: torch.seed()
    acc.seed_all = lambda self: torch.seed()
    acc.initial_seed = lambda self: torch.initial_seed()
    return True


class _NullStream:
    """Stands in for a device stream where work is synchronous (CPU): every wait is already satisfied."""

    def wait_stream(self, other):
        pass

    def wait_event(self, event):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def record_event(self, event=None):
        return _NullEvent()


class _NullEvent:
    def record(self, stream=None):
        pass

    def wait(self, stream=None):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


@_patch
def cpu_streams() -> bool:
    """ZeRO: LowLevelZero's bucket store and reduction ask the accelerator for streams, which CpuAccelerator
    refuses. On CPU all work is synchronous, so null streams are exact (overlap_communication must be off)."""
    acc = _cpu_accelerator()
    acc.Stream = lambda self, device=None, priority=0, **kw: _NullStream()
    acc.Event = lambda self, enable_timing=False, blocking=False, interprocess=False: _NullEvent()
    acc.current_stream = lambda self, device=None: _NullStream()
    acc.default_stream = lambda self, device=None: _NullStream()
    acc.set_stream = lambda self, stream_: None
    acc.stream = lambda self, stream_: contextlib.nullcontext()
    acc.synchronize = lambda self, device=None: None
    return True


@_patch
def cpu_memory_stats() -> bool:
    """Memory statistics and cache control are no-ops on CPU (colossalai's logging and Booster paths call them)."""
    acc = _cpu_accelerator()
    for name in ("memory_allocated", "max_memory_allocated", "memory_reserved", "max_memory_reserved"):
        setattr(acc, name, lambda self, device=None: 0)
    for name in ("empty_cache", "reset_max_memory_allocated", "reset_max_memory_cached", "reset_peak_memory_stats"):
        setattr(acc, name, lambda self, device=None: None)
    acc.memory_stats = lambda self, device=None: {}
    acc.memory_summary = lambda self, device=None, abbreviated=False: ""
    acc.device_count = lambda self: 1
    return True


@_patch
def zero_on_cpu() -> bool:
    """ZeRO: `LowLevelZeroOptimizer._sanity_checks` asserts the accelerator is cuda or npu ("device is required").
    Keep its dtype check and accept cpu too."""
    from colossalai.zero.low_level.low_level_optim import LowLevelZeroOptimizer

    original = LowLevelZeroOptimizer._sanity_checks
    if getattr(original, "_colossal_shear", False):
        return False

    def _sanity_checks(self):
        from colossalai.accelerator import get_accelerator

        assert get_accelerator().name in ("cuda", "npu", "cpu"), "device is required"
        for group in self.optim.param_groups:
            for param in group["params"]:
                if not getattr(param, "skip_zero_check", False):
                    assert param.dtype == self._dtype, (
                        f"Parameters are expected to have the same dtype `{self._dtype}`, but got `{param.dtype}`"
                    )

    _sanity_checks._colossal_shear = True
    LowLevelZeroOptimizer._sanity_checks = _sanity_checks
    return True


# colossalai's modules that read or write checkpoint files with torch.load / torch.save
CHECKPOINT_MODULES = (
    "colossalai.checkpoint_io.utils",
    "colossalai.checkpoint_io.checkpoint_io_base",
    "colossalai.checkpoint_io.hybrid_parallel_checkpoint_io",
    "colossalai.checkpoint_io.moe_checkpoint",
    "colossalai.booster.plugin.gemini_plugin",
    "colossalai.booster.plugin.torch_fsdp_plugin",
)


def save_keeping_os_reason(obj, f, *args, **kwargs):
    """torch.save; to a path, through a Python file, whose OSError ("No space left on device") stays in the error's
    __context__ where torch's own writer reports only "enforce fail at inline_container.cc"."""
    if isinstance(f, (str, os.PathLike)):
        with open(f, "wb") as handle:
            return torch.save(obj, handle, *args, **kwargs)
    return torch.save(obj, f, *args, **kwargs)


class _CheckpointTorch(types.ModuleType):
    """`torch` as colossalai's checkpoint code sees it (everything else is delegated to torch)."""

    def __init__(self):
        super().__init__("torch")

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def load(f, *args, **kwargs):
        kwargs["weights_only"] = True  # tensors and plain containers only, never arbitrary pickled objects
        try:
            return torch.load(f, *args, **kwargs)
        except pickle.UnpicklingError as e:  # say which file holds what was refused, in one line
            found = re.search(r"GLOBAL (\S+)", str(e))
            raise pickle.UnpicklingError(
                f"{f}: refused: it holds a pickled object, not only tensors" + (f" ({found.group(1)})" if found else "")
            ) from None

    save = staticmethod(save_keeping_os_reason)


@_patch
def checkpoint_file_io() -> bool:
    """Checkpoint files: colossalai loads optimizer shards and param groups with `torch.load` without
    `weights_only` (torch's default, which TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 turns into arbitrary unpickling), and
    `torch.save` to a path reports a full disk as "enforce fail at inline_container.cc", without the OS reason."""
    proxy = _CheckpointTorch()
    for name in CHECKPOINT_MODULES:
        module = importlib.import_module(name)
        if getattr(module, "torch", None) is torch:
            module.torch = proxy
    return True


def _is_padded(tensor) -> bool:
    return hasattr(tensor, "_padding_dim")


@_patch
def padded_vocab_checkpoint() -> bool:
    """The 3d plugin pads the vocabulary to a multiple of 64 (times tp); then saving a checkpoint fails: the padded
    embedding reaches `to_unpadded_tensor` as a detached copy, which carries the padding attributes but not the
    saved methods ("'Tensor' object has no attribute '_unpad_detach'", tp=1), and `search_tp_partition_dim` asserts
    that each tensor-parallel shard is exactly 1/tp of the unpadded size ("isn't evenly distributed", tp>1)."""
    from colossalai.checkpoint_io import utils as ckpt_utils
    from colossalai.tensor.padded_tensor import api

    original_unpad = api.to_unpadded_tensor
    if getattr(original_unpad, "_colossal_shear", False):
        return False

    def to_unpadded_tensor(ptensor):
        if _is_padded(ptensor) and not hasattr(ptensor, "_unpad_detach"):  # a detached copy: slice, forget padding
            unpad = [slice(None)] * ptensor.dim()
            unpad[ptensor._padding_dim] = slice(None, ptensor._origin_length)
            ptensor.data = ptensor.data[tuple(unpad)]
            for attr in ("_padding_dim", "_origin_length", "_current_length"):
                delattr(ptensor, attr)
            return ptensor
        return original_unpad(ptensor)

    def search_tp_partition_dim(current_shape, original_shape, tp_size):
        for dim, length in enumerate(original_shape):
            if length > current_shape[dim]:
                # padded (vocabulary) dimensions hold up to tp * shard rows, the last ones padding
                assert length <= tp_size * current_shape[dim], (
                    f"The parameter isn't evenly distributed among tensor parallel group: shape before sharding "
                    f"{original_shape}, shape after sharding {current_shape}"
                )
                return dim
        return None

    to_unpadded_tensor._colossal_shear = True
    _rebind(
        "to_unpadded_tensor",
        original_unpad,
        to_unpadded_tensor,
        "colossalai.tensor.padded_tensor.api",
        "colossalai.tensor.padded_tensor",
        "colossalai.checkpoint_io.hybrid_parallel_checkpoint_io",
        "colossalai.zero.gemini.gemini_ddp",
        "colossalai.zero.gemini.gemini_optimizer",
    )
    _rebind(
        "search_tp_partition_dim",
        ckpt_utils.search_tp_partition_dim,
        search_tp_partition_dim,
        "colossalai.checkpoint_io.utils",
        "colossalai.checkpoint_io.hybrid_parallel_checkpoint_io",
        "colossalai.checkpoint_io.moe_checkpoint",
    )
    return True


@_patch
def strict_shapes() -> bool:
    """Loading a model checkpoint: `load_state_dict_into_model(..., strict=True)` (ddp, zero2, gemini's general
    path) raises only for unexpected keys and drops torch's size-mismatch messages, so a checkpoint of another
    model shape loads silently (the mismatched tensors keep the new model's values). Raise them like torch does."""
    from colossalai.checkpoint_io import utils as ckpt_utils

    original = ckpt_utils.load_state_dict_into_model
    if getattr(original, "_colossal_shear", False):
        return False

    def load_state_dict_into_model(model, state_dict, missing_keys, strict=False, load_sub_module=True):
        if strict:
            target = model.base_model if hasattr(model, "patch_state_dict") else model
            own = target.state_dict()
            wrong = [
                f"{k}: checkpoint {tuple(v.shape)}, model {tuple(own[k].shape)}"
                for k, v in state_dict.items()
                if k in own and hasattr(v, "shape") and tuple(v.shape) != tuple(own[k].shape)
            ]
            if wrong:
                raise RuntimeError(
                    f"Error(s) in loading state_dict for {target.__class__.__name__}: size mismatch for {wrong[0]}"
                    + (f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else "")
                )
        return original(model, state_dict, missing_keys, strict, load_sub_module)

    load_state_dict_into_model._colossal_shear = True
    _rebind(
        "load_state_dict_into_model",
        original,
        load_state_dict_into_model,
        "colossalai.checkpoint_io.utils",
        "colossalai.checkpoint_io.general_checkpoint_io",
        "colossalai.checkpoint_io.hybrid_parallel_checkpoint_io",
    )
    return True


@_patch
def qwen2_padded_head() -> bool:
    """3d with a Qwen2 model: the embedding is padded to a multiple of 64·tp rows (VocabParallelEmbedding1D, or
    PaddingEmbedding for a tied head without tp), but Qwen2's policy keeps the LM head a plain Linear1D_Col / Linear
    that knows nothing of padding. A tied head then shares the padded weight and its padding rows (zeros) enter the
    softmax: the loss is not the model's (0.02-0.045 off on a tiny model), and an untied head whose vocabulary tp
    does not divide cannot be split. Give Qwen2 the head Llama's and Mistral's policies give theirs:
    VocabParallelLMHead1D under tp (its output drops the padding columns), PaddingLMHead otherwise."""
    from colossalai.shardformer.layer import PaddingLMHead, VocabParallelLMHead1D
    from colossalai.shardformer.policies.base_policy import ModulePolicyDescription, SubModuleReplacementDescription
    from colossalai.shardformer.policies.qwen2 import Qwen2ForCausalLM, Qwen2ForCausalLMPolicy

    original = Qwen2ForCausalLMPolicy.module_policy
    if getattr(original, "_colossal_shear", False):
        return False

    def module_policy(self):
        policy = original(self)
        shard = self.shard_config
        if self.pipeline_stage_manager is not None and self.pipeline_stage_manager.use_zbv:
            return policy  # zero-bubble pipelines keep their own head (LinearWithGradAccum)
        if shard.enable_tensor_parallelism:
            head = SubModuleReplacementDescription(
                suffix="lm_head",
                target_module=VocabParallelLMHead1D,
                kwargs={
                    "gather_output": not shard.parallel_output,
                    "make_vocab_size_divisible_by": shard.make_vocab_size_divisible_by,
                    "fp8_communication": shard.fp8_communication,
                },
            )
        else:
            head = SubModuleReplacementDescription(
                suffix="lm_head",
                target_module=PaddingLMHead,
                kwargs={"make_vocab_size_divisible_by": shard.make_vocab_size_divisible_by},
            )
        entry = policy.get(Qwen2ForCausalLM)
        if entry is None:
            policy[Qwen2ForCausalLM] = ModulePolicyDescription(sub_module_replacement=[head])
        else:
            kept = [d for d in (entry.sub_module_replacement or []) if d.suffix != "lm_head"]
            entry.sub_module_replacement = [*kept, head]
        return policy

    module_policy._colossal_shear = True
    Qwen2ForCausalLMPolicy.module_policy = module_policy
    return True


def _rebind(attr: str, original, replacement, *module_names: str) -> None:
    """Point every module that imported `original` under `attr` (`from x import f` copies the name) at the
    replacement."""
    for name in module_names:
        module = importlib.import_module(name)
        if getattr(module, attr, None) is original:
            setattr(module, attr, replacement)


class _DropMessage(logging.Filter):
    """Drops one known, harmless log line of a dependency (and nothing else)."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


# colossalai imports peft, which imports bitsandbytes, whose CPU backend asks a model hub for an optional 4-bit kernel
# that training never uses and logs a warning per process when it cannot: drop exactly that line.
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    _DropMessage("Failed to load CPU gemm_4bit_forward from kernels-community")
)


# Known, harmless warnings colossalai prints in every process of every run, each dropped by its exact message (and
# nothing else): optional CUDA-only extras it cannot use here, and collectives torch renamed after 0.5.0's release.
KNOWN_NOISE = (
    (UserWarning, r"Please install the latest tensornvme"),
    (UserWarning, r"Please install apex from source"),
    (FutureWarning, r"`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor)` is deprecated"),
)
for _category, _message in KNOWN_NOISE:
    warnings.filterwarnings("ignore", message=_message, category=_category)


def install() -> list[str]:
    """Apply every patch once; return the names applied by this call."""
    done = []
    for name, fn in PATCHES.items():
        if name in _applied:
            continue
        if fn():
            done.append(name)
        _applied.append(name)
    return done


def applied() -> list[str]:
    return list(_applied)


def versions() -> dict[str, str]:
    import colossalai
    import transformers

    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "colossalai": colossalai.__version__,
        "cuda": str(torch.version.cuda),
        "gpus": str(torch.cuda.device_count() if torch.cuda.is_available() else 0),
    }


if __name__ == "__main__":
    if "--report" in sys.argv:
        import warnings

        warnings.filterwarnings("ignore")
        from colossalai.booster import Booster  # noqa: F401  (the import chain users hit first)

        from colossal_shear.core.logger import get_logger

        log = get_logger(__name__)
        log.info("colossal_shear environment: " + ", ".join(f"{k} {v}" for k, v in versions().items()))
        log.info("compat patches applied: " + (", ".join(install()) or "none"))

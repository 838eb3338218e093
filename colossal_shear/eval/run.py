"""`evaluate(cfg)`: what evaluate.py runs. Every input is checked before the model loads (unknown task, missing model
directory, missing or empty text file: one error line each)."""

from __future__ import annotations

import os
from pathlib import Path

from colossal_shear.core.errors import ConfigError
from colossal_shear.core.logger import get_logger
from colossal_shear.eval.benchmarks import check_tasks
from colossal_shear.eval.config import EvalConfig
from colossal_shear.eval.results import make_results, write_results
from colossal_shear.eval.text import read_texts

log = get_logger(__name__)


def preflight(cfg: EvalConfig) -> None:
    if not (Path(cfg.model) / "config.json").is_file():
        why = "no such directory" if not Path(cfg.model).is_dir() else "no config.json in it"
        raise ConfigError(f"--model: {cfg.model}: {why} (expected a Hugging Face model directory)")
    if not cfg.tasks and not cfg.text_eval:
        raise ConfigError("nothing to evaluate: give --tasks and/or --text_eval")
    check_tasks(cfg.tasks)
    read_texts(cfg.text_eval)
    if cfg.limit is not None and cfg.limit < 1:
        raise ConfigError(f"--limit: expected a positive number of documents, got {cfg.limit}")
    if cfg.batch_size < 1:
        raise ConfigError(f"--batch_size: expected a positive number, got {cfg.batch_size}")


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def device_and_dtype(cfg: EvalConfig):
    """--device, else this process's GPU (LOCAL_RANK under torchrun) or the CPU; --dtype, else bf16 on a GPU and
    fp32 on the CPU."""
    import torch

    from colossal_shear.core.constants import DTYPES

    device = cfg.device or (f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu")
    if cfg.dtype:
        return device, DTYPES[cfg.dtype]
    return device, torch.bfloat16 if device.startswith("cuda") else torch.float32


def load_model(cfg: EvalConfig):
    """The model in evaluation mode on its device (bf16 on a GPU, fp32 on the CPU unless --dtype), its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device, dtype = device_and_dtype(cfg)
    model = AutoModelForCausalLM.from_pretrained(
        cfg.model, torch_dtype=dtype, trust_remote_code=cfg.trust_remote_code, low_cpu_mem_usage=True
    )
    tokenizer = AutoTokenizer.from_pretrained(cfg.model, trust_remote_code=cfg.trust_remote_code)
    return model.to(device).eval(), tokenizer


def evaluate(cfg: EvalConfig) -> dict | None:
    """Accuracy on cfg.tasks and text metrics on cfg.text_eval; results.json when cfg.output. Launched on several
    GPUs (torchrun), lm-eval's HFLM loads the model and splits the documents; rank 0 then computes the text metrics
    and writes the results, the other ranks return None."""
    from colossal_shear.eval.harness import go_offline, make_lm, run_tasks
    from colossal_shear.eval.text import text_metrics

    preflight(cfg)
    go_offline()
    data_parallel = world_size() > 1
    model = tokenizer = None
    if not data_parallel:
        model, tokenizer = load_model(cfg)
    tasks = None
    if cfg.tasks:
        dtype = str(device_and_dtype(cfg)[1]).removeprefix("torch.")
        lm = make_lm(model, tokenizer, cfg.batch_size, cfg.model if data_parallel else None, dtype, cfg.progress)
        tasks = run_tasks(lm, cfg.tasks, cfg.num_fewshot, cfg.limit, cfg.data_dir, cfg.seed)
        if tasks is None:
            return None  # not rank 0
        del lm
    text = None
    if cfg.text_eval:
        if model is None:
            model, tokenizer = load_model(cfg)
        text = text_metrics(model, tokenizer, cfg.text_eval, cfg.batch_size, cfg.max_length, cfg.progress)
    results = make_results(cfg.model, tasks, text)
    if cfg.output is not None:
        write_results(cfg.output, results)
        log.info(f"results: {cfg.output}")
    return results

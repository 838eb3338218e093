"""Accuracy through lm-evaluation-harness: its `HFLM` wrapper around the loaded model, its task definitions from the
YAMLs `benchmarks.write_task_yamls` generates (lm-eval's own, pointed at the local data), its `simple_evaluate`.

Data parallelism: lm-eval splits the documents over processes only when HFLM loads the model itself under
`accelerate launch` / `torchrun` on several GPUs; `evaluate.py` launched that way passes the model directory
(`pretrained=` a path), rank 0 gathers the scores. Everywhere else the loaded model instance is wrapped (one device).
"""

from __future__ import annotations

import functools
import logging
import os
import tempfile
from pathlib import Path

from colossal_shear.eval.benchmarks import check_tasks, data_root, is_user_task, write_task_yamls

OFFLINE_ENV = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
RESULT_KEYS = {"acc": "acc,none", "acc_norm": "acc_norm,none", "acc_stderr": "acc_stderr,none"}


def go_offline() -> None:
    """No hub, no dataset downloads: the data is local (set before `datasets` is imported, where it is read)."""
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    for name in ("lm_eval", "lm-eval"):
        logging.getLogger(name).setLevel(os.environ.get("COLOSSAL_SHEAR_LM_EVAL_LOG", "ERROR"))


def make_lm(
    model, tokenizer, batch_size: int, model_dir: str | None = None, dtype: str | None = None, progress: bool = True
):
    """lm-eval's HFLM: on the loaded model; or, given `model_dir` (a data-parallel launch on GPUs), loading it itself
    so that lm-eval splits the documents over the processes (Accelerate). `progress=False`: its request loops' bars
    off (each takes `disable_tqdm`)."""
    from lm_eval.models.huggingface import HFLM

    if model_dir is not None:
        lm = HFLM(pretrained=str(model_dir), dtype=dtype or "bfloat16", batch_size=batch_size, device="cuda")
    else:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    if not progress:
        for name in ("loglikelihood", "loglikelihood_rolling", "generate_until"):
            setattr(lm, name, functools.partial(getattr(lm, name), disable_tqdm=True))
    return lm


def run_tasks(
    lm,
    tasks: list[str],
    num_fewshot: int = 0,
    limit: int | None = None,
    data_dir: Path | None = None,
    seed: int = 1234,
    samples: list[int] | None = None,
) -> dict[str, dict] | None:
    """{task: {acc, acc_norm, acc_stderr, n}} (None on ranks other than 0 of a data-parallel run).

    `samples`: only these documents (indices into each task's validation set; not with `limit`), through lm-eval's
    `simple_evaluate(samples=...)`. `samples=range(N)` scores exactly what `limit=N` does; at 0-shot any disjoint
    pieces pool (`results.pool`) to the whole run's figures. With few-shot examples a piece's prompts differ from the
    whole run's (lm-eval draws each document's examples from one random sequence per task, in document order)."""
    if samples is not None:
        samples = _check_samples(samples, limit)
    go_offline()
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    names = check_tasks(tasks)
    root = None if all(is_user_task(t) for t in tasks) else data_root(data_dir)
    with tempfile.TemporaryDirectory(prefix="colossal_shear-tasks-") as include:
        write_task_yamls(tasks, root, Path(include))
        manager = TaskManager(include_path=include, include_defaults=False)
        out = simple_evaluate(
            model=lm,
            tasks=names,
            num_fewshot=num_fewshot,
            limit=limit,
            samples=None if samples is None else dict.fromkeys(names, samples),
            task_manager=manager,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
    return None if out is None else task_scores(out, names)


def _check_samples(samples, limit: int | None) -> list[int]:
    """Sorted, distinct, non-empty (lm-eval reads an empty list as "all documents" and maps its own positions back to
    document indices assuming ascending order)."""
    if limit is not None:
        raise ValueError("run_tasks: give limit or samples, not both")
    indices = sorted(set(samples))
    if not indices or indices[0] < 0:
        raise ValueError(f"run_tasks: samples must be non-empty document indices >= 0, got {list(samples)[:5]}")
    return indices


def task_scores(out: dict, names: list[str]) -> dict[str, dict]:
    """The per-task figures of a `simple_evaluate` result, as results.json holds them (None where a task has no
    such metric: acc_norm of winogrande, boolq, copa...)."""
    scores = {}
    for name in names:
        result = out["results"][name]
        scores[name] = {key: _number(result.get(lm_key)) for key, lm_key in RESULT_KEYS.items()}
        scores[name]["n"] = int(out["n-samples"][name]["effective"])
    return scores


def _number(value):
    return None if value is None or isinstance(value, str) else float(value)

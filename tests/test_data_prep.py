"""Data preparation (issue 4): conservation, loss masks, splitting, buckets, determinism, inputs, errors, atomicity.

Everything runs on the real bundled tokenizer and real `datasets` Arrow output. Expected values are computed here
independently: documents with `tokenizer(text, add_special_tokens=False)` and packing with a plain-Python reference
of the contract (per category, concatenate documents in input order and cut every max_length tokens).
"""

import gzip
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from datasets import load_from_disk

from colossal_shear.bundled import corpus_files
from colossal_shear.data import (
    IGNORE_INDEX,
    DataPrepError,
    PrepareConfig,
    part_paths,
    prepare_dataset,
    read_manifest,
    tokenizer_fingerprint,
)
from colossal_shear.data.packing import CategoryPacker

ROOT = Path(__file__).resolve().parent.parent
L = 64


# ----------------------------------------------------------------------------------------------------------- helpers


def write_jsonl(path: Path, records, gz: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = "".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in records).encode()
    if gz:
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)
    return path


def bundled_records(per_category: int) -> list[dict]:
    out = []
    for path in corpus_files():
        with open(path, encoding="utf-8") as f:
            out += [json.loads(line) for _, line in zip(range(per_category), f)]
    return out


def synthetic_records() -> list[dict]:
    long_text = " ".join(r["target"] for r in bundled_records(2)[:2])  # several times max_length tokens
    return [
        {"source": "Question: what is 2+2?", "target": " Four.", "category": "qa"},
        {"source": "Translate: 你好", "target": " Hello", "category": "qa"},
        {"text": "A plain text record with no source.", "category": "qa"},
        {"source": "", "target": "", "category": "qa"},  # empty target: the document is [BOS, EOS]
        {"source": None, "target": "missing category"},
        {"target": "empty category", "category": ""},
        {"target": long_text, "category": "long"},
        {"target": "after the long one", "category": "long"},
    ]


def run(tmp_path: Path, inputs, name="out", **kw) -> tuple[Path, dict]:
    out = tmp_path / name
    cfg = dict(max_length=L, num_spliced_dataset_bins=3, num_proc=1, progress=False)
    cfg.update(kw)
    tok = cfg.pop("tokenizer_dir")
    return out, prepare_dataset(PrepareConfig(inputs, tok, str(out), **cfg))


def load_parts(out: Path) -> list[list[dict]]:
    return [load_from_disk(str(p)).to_list() for p in part_paths(out)]


def reference(tok, records) -> tuple[dict, dict]:
    """({category: sorted reference sequences}, {category: documents}) from the contract, in plain Python."""
    docs: dict[str, list] = {}
    for r in records:
        target = r["target"] if "target" in r else r["text"]
        src = tok(r.get("source") or "", add_special_tokens=False).input_ids if r.get("source") else []
        tgt = tok(target, add_special_tokens=False).input_ids
        ids = [tok.bos_token_id] + src + tgt + [tok.eos_token_id]
        labels = [IGNORE_INDEX] * (1 + len(src)) + tgt + [tok.eos_token_id]
        docs.setdefault(r.get("category") or "unknown", []).append((ids, labels))
    seqs = {}
    for cat, items in docs.items():
        rows, cur_ids, cur_labels, cur_lens = [], [], [], []
        for ids, labels in items:
            while ids:
                room = L - len(cur_ids)
                cur_ids += ids[:room]
                cur_labels += labels[:room]
                cur_lens.append(len(ids[:room]))
                ids, labels = ids[room:], labels[room:]
                if len(cur_ids) == L:
                    rows.append((tuple(cur_ids), tuple(cur_labels), tuple(cur_lens)))
                    cur_ids, cur_labels, cur_lens = [], [], []
        if cur_ids:
            rows.append((tuple(cur_ids), tuple(cur_labels), tuple(cur_lens)))
        seqs[cat] = sorted(rows)
    return seqs, docs


def output_sequences(parts) -> dict:
    got: dict[str, list] = {}
    for part in parts:
        for row in part:
            n = row["num_tokens"]
            got.setdefault(row["category"], []).append(
                (tuple(row["input_ids"][:n]), tuple(row["labels"][:n]), tuple(row["doc_lengths"]))
            )
    return {c: sorted(v) for c, v in got.items()}


def data_bytes(out: Path) -> dict[str, bytes]:
    """Every file of every part (data, dataset_info.json, state.json with its fingerprint)."""
    return {str(f.relative_to(out)): f.read_bytes() for f in sorted((out / "arrow").rglob("*")) if f.is_file()}


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Two input files (the second mixes categories) and the records in reading order."""
    d = tmp_path_factory.mktemp("corpus")
    first, second = bundled_records(4), synthetic_records()
    write_jsonl(d / "a.jsonl", first)
    write_jsonl(d / "b.jsonl", second)
    (d / "notes.txt").write_text("not an input")
    return d, first + second


@pytest.fixture(scope="module")
def prepared(corpus, tokenizer_dir, tmp_path_factory):
    """One run through the worker pool, with tiny batches and buffers so batch seams and spills are exercised."""
    d, records = corpus
    out, manifest = run(
        tmp_path_factory.mktemp("prepared"),
        [str(d)],
        tokenizer_dir=str(tokenizer_dir),
        num_proc=2,
        batch_lines=3,
        buffer_size=8,
        seed=7,
    )
    return out, manifest, load_parts(out), records


# ------------------------------------------------------------------------------------------------------------ tests


def test_packer_splits_across_batches_and_counts_documents():
    p = CategoryPacker(max_length=4, pad_id=0)
    lens = [3, 1, 6, 2]  # stream of 12 tokens -> rows [3,1] [4] [2,2]
    ids = np.arange(1, 13, dtype=np.int32)
    rows = [
        p.add(ids[:3], ids[:3], np.array([3])),
        p.add(ids[3:4], ids[3:4], np.array([1])),
        p.add(ids[4:12], ids[4:12], np.array([6, 2])),
        p.finish(),
    ]
    blocks = [r for r in rows if r is not None]
    got_ids = np.concatenate([b.input_ids for b in blocks])
    assert got_ids.tolist() == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]]
    counts = np.concatenate([b.segment_counts for b in blocks]).tolist()
    assert np.split(np.concatenate([b.segment_lengths for b in blocks]), np.cumsum(counts)[:-1])[2].tolist() == [2, 2]
    assert counts == [2, 1, 2] and sum(lens) == 12
    assert np.concatenate([b.documents for b in blocks]).tolist() == [2, 1, 1]  # row 2 starts mid-document
    p.add(ids[:5], ids[:5], np.array([5]))  # 5 tokens: one full row + a padded tail
    tail = p.finish()
    assert tail.input_ids.tolist() == [[5, 0, 0, 0]] and tail.labels.tolist() == [[5, -100, -100, -100]]
    assert tail.num_tokens.tolist() == [1] and tail.documents.tolist() == [0]


def test_conservation_labels_and_boundaries(prepared, tok):
    out, manifest, parts, records = prepared
    expected, docs = reference(tok, records)
    got = output_sequences(parts)
    # every sequence is exactly one max_length window of its category's document stream: nothing lost, nothing
    # reordered inside a document, labels = target + EOS only, doc_lengths = the document boundaries
    assert got == expected
    all_docs = [d for items in docs.values() for d in items]
    assert manifest["totals"]["tokens"] == sum(len(ids) for ids, _ in all_docs)
    assert manifest["totals"]["loss_tokens"] == sum(sum(x != IGNORE_INDEX for x in lab) for _, lab in all_docs)
    assert manifest["totals"]["documents"] == manifest["totals"]["records"] == len(records)
    pad = tok.unk_token_id
    for part in parts:
        for row in part:
            n = row["num_tokens"]
            assert len(row["input_ids"]) == len(row["labels"]) == L
            assert sum(row["doc_lengths"]) == n and all(x > 0 for x in row["doc_lengths"])
            assert row["input_ids"][n:] == [pad] * (L - n) and row["labels"][n:] == [IGNORE_INDEX] * (L - n)
            assert row["doc_categories"] == [row["category"]] * len(row["doc_lengths"])
            # each segment's labels: -100 only on a prefix (BOS + source), never after target tokens
            starts = np.cumsum([0] + row["doc_lengths"][:-1])
            for s, ln in zip(starts, row["doc_lengths"]):
                lab = row["labels"][s : s + ln]
                masked = [x == IGNORE_INDEX for x in lab]
                assert masked == sorted(masked, reverse=True)


def test_long_document_split_not_truncated(prepared, tok):
    _, manifest, parts, records = prepared
    long_doc = next(r for r in records if r.get("category") == "long")
    n = len(tok(long_doc["target"], add_special_tokens=False).input_ids) + 2
    assert n > 3 * L
    cat = manifest["categories"]["long"]
    extra = len(tok("after the long one", add_special_tokens=False).input_ids) + 2
    assert cat["tokens"] == n + extra
    assert cat["sequences"] == -(-(n + extra) // L)
    rows = [r for p in parts for r in p if r["category"] == "long"]
    assert sum(r["num_tokens"] for r in rows) == n + extra
    # the long document fills whole sequences (its first part and its continuations), the rest shares the last one
    assert sum(1 for r in rows if r["doc_lengths"] == [L]) == n // L
    assert [r["doc_lengths"] for r in rows if r["doc_lengths"] != [L]] == [[n % L, extra]]


def test_text_records_and_unknown_category(prepared, tok):
    _, manifest, parts, _ = prepared
    assert "unknown" in manifest["categories"] and manifest["categories"]["unknown"]["documents"] == 2
    rows = [r for p in parts for r in p if r["category"] == "qa"]
    text_ids = tok("A plain text record with no source.", add_special_tokens=False).input_ids
    doc = [tok.bos_token_id] + text_ids + [tok.eos_token_id]
    flat = [(i, l) for r in rows for i, l in zip(r["input_ids"][: r["num_tokens"]], r["labels"][: r["num_tokens"]])]
    ids = [i for i, _ in flat]
    k = next(j for j in range(len(ids)) if ids[j : j + len(doc)] == doc)
    assert [l for _, l in flat[k : k + len(doc)]] == [IGNORE_INDEX] + text_ids + [tok.eos_token_id]


def test_buckets_and_manifest_counts(prepared):
    out, manifest, parts, _ = prepared
    assert [p.name for p in part_paths(out)] == [f"part-{k:05d}" for k in range(len(parts))]
    counts = {c: s["sequences"] for c, s in manifest["categories"].items()}
    bins = manifest["num_spliced_dataset_bins"]
    assert len(parts) == min(bins, max(counts.values()))
    for k, (part, entry) in enumerate(zip(parts, manifest["parts"])):
        assert entry["name"] == f"part-{k:05d}" and entry["sequences"] == len(part) > 0
        seen = Counter(r["category"] for r in part)
        assert {c: s["sequences"] for c, s in entry["categories"].items() if s["sequences"]} == dict(seen)
        for cat, s in entry["categories"].items():
            rows = [r for r in part if r["category"] == cat]
            assert s["tokens"] == sum(r["num_tokens"] for r in rows)
            assert s["loss_tokens"] == sum(sum(x != IGNORE_INDEX for x in r["labels"]) for r in rows)
            assert s["segments"] == sum(len(r["doc_lengths"]) for r in rows)
    # bin k of every category: each category's sequences are spread evenly over the parts (sizes differ by <= 1),
    # and a category with fewer sequences than parts has at most one in any part
    for cat, n in counts.items():
        sizes = [Counter(r["category"] for r in p)[cat] for p in parts]
        assert sum(sizes) == n
        assert max(sizes) - min(sizes) <= 1, (cat, sizes)
    assert any(n < len(parts) for n in counts.values())  # the corpus exercises the small-category case
    totals = manifest["totals"]
    assert totals["sequences"] == sum(len(p) for p in parts)
    assert totals["padding_tokens"] == totals["sequences"] * L - totals["tokens"]


def test_manifest_tokenizer_and_read(prepared, tok, tokenizer_dir):
    out, manifest, _, _ = prepared
    assert read_manifest(out) == manifest == read_manifest(out / "manifest.json")
    assert manifest["tokenizer"] == tokenizer_fingerprint(tok)
    assert manifest["tokenizer"]["vocab_size"] == len(tok) == 2048
    assert manifest["max_length"] == L and manifest["seed"] == 7 and "--max_length 64" in manifest["command"]
    assert set(manifest["columns"]) == set(load_from_disk(str(part_paths(out)[0])).column_names)
    # the hash follows the vocabulary
    from transformers import AutoTokenizer

    other = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    other.add_tokens(["<new_piece>"])
    assert tokenizer_fingerprint(other)["hash"] != manifest["tokenizer"]["hash"]
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        read_manifest(out / "arrow")


def test_deterministic_across_runs_and_num_proc_seed_changes_order(prepared, corpus, tokenizer_dir, tmp_path):
    out, manifest, parts, _ = prepared
    d, _ = corpus
    kw = dict(tokenizer_dir=str(tokenizer_dir), batch_lines=5, seed=7)
    same, m_same = run(tmp_path, [str(d)], name="same", **kw)  # one process, other batching: same bytes
    assert data_bytes(same) == data_bytes(out) and len(data_bytes(out)) == 3 * len(parts)
    assert {k: v for k, v in m_same.items() if k != "command"} == {k: v for k, v in manifest.items() if k != "command"}
    other, m_other = run(tmp_path, [str(d)], name="other", **{**kw, "seed": 8})
    other_parts = load_parts(other)
    assert [[r["input_ids"] for r in p] for p in other_parts] != [[r["input_ids"] for r in p] for p in parts]
    assert output_sequences(other_parts) == output_sequences(parts)  # same sequences, other bins and order


def test_gz_and_single_file_inputs(tmp_path, tokenizer_dir, tok):
    records = synthetic_records()
    gz_dir = tmp_path / "gz"
    write_jsonl(gz_dir / "part1.jsonl.gz", records[:4], gz=True)
    single = write_jsonl(tmp_path / "single.jsonl", records[4:])
    out, manifest = run(tmp_path, f"{gz_dir},{single}", tokenizer_dir=str(tokenizer_dir))
    assert [Path(i["path"]).name for i in manifest["inputs"]] == ["part1.jsonl.gz", "single.jsonl"]
    assert [i["records"] for i in manifest["inputs"]] == [4, len(records) - 4]
    assert output_sequences(load_parts(out)) == reference(tok, records)[0]


BAD = [
    ('{"target": "ok"', "invalid JSON", "invalid_json"),
    ('["target", "ok"]', "expected a JSON object, got array", "not_an_object"),
    ('{"target": 3}', "expected a string, got number (field 'target')", "wrong_type"),
    ('{"target": "ok", "source": ["x"]}', "expected a string, got array (field 'source')", "wrong_type"),
    ('{"target": "ok", "category": 5}', "expected a string, got number (field 'category')", "wrong_type"),
    ('{"source": "only a source"}', "missing field (field 'target'", "missing_field"),
    (b'{"target": "caf\xe9"}', "invalid UTF-8", "invalid_utf8"),
    ('{"target": "lone \\ud800 surrogate"}', "cannot be tokenised", "unencodable_text"),
]


@pytest.mark.parametrize("line,message,reason", BAD, ids=[b[2] + str(i) for i, b in enumerate(BAD)])
def test_bad_line_names_file_and_line_and_leaves_no_output(tmp_path, tokenizer_dir, line, message, reason):
    good = [json.dumps({"target": f"good record {i}", "category": "c"}) for i in range(30)]
    path = tmp_path / "in" / "data.jsonl"
    path.parent.mkdir()
    raw = b"\n".join(x if isinstance(x, bytes) else x.encode() for x in [*good, line]) + b"\n"
    path.write_bytes(raw)  # the bad line is the last one (31): work has been done when it is found
    with pytest.raises(DataPrepError) as err:
        run(tmp_path, [str(path.parent)], tokenizer_dir=str(tokenizer_dir), batch_lines=4, buffer_size=1)
    assert str(err.value).startswith(f"{path}:31: ") and message in str(err.value)
    assert err.value.reason == reason
    assert sorted(os.listdir(tmp_path)) == ["in"]  # no output directory, no temporary left behind


def test_skip_invalid_counts_per_reason(tmp_path, tokenizer_dir):
    lines = [
        json.dumps({"target": "fine", "category": "c"}),
        "{not json",
        "[1]",
        json.dumps({"target": None}),
        json.dumps({"target": 1}),
        "",
        json.dumps({"text": "also fine"}),
    ]
    path = tmp_path / "in.jsonl"
    path.write_bytes(("\n".join(lines) + "\n").encode() + b'{"target": "\xff"}\n')
    out, manifest = run(tmp_path, [str(path)], tokenizer_dir=str(tokenizer_dir), skip_invalid=True)
    assert manifest["skipped"] == {"invalid_json": 1, "invalid_utf8": 1, "not_an_object": 1, "wrong_type": 2}
    assert manifest["totals"]["records"] == manifest["totals"]["documents"] == 2
    assert manifest["totals"]["skipped"] == 5
    path.write_bytes(b"[1]\n")  # nothing valid at all: an error even with --skip_invalid
    with pytest.raises(DataPrepError, match="no documents.*not_an_object"):
        run(tmp_path, [str(path)], name="none", tokenizer_dir=str(tokenizer_dir), skip_invalid=True)


def test_empty_input_dir_and_tokenizer_without_eos(tmp_path, tokenizer_dir):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no jsonl here")
    with pytest.raises(DataPrepError, match=f"{empty}: no .jsonl or .jsonl.gz files"):
        run(tmp_path, [str(empty)], tokenizer_dir=str(tokenizer_dir))
    with pytest.raises(DataPrepError, match="does not exist"):
        run(tmp_path, [str(tmp_path / "missing")], tokenizer_dir=str(tokenizer_dir))
    corrupt = write_jsonl(tmp_path / "gz" / "c.jsonl.gz", [{"target": "x" * 5000}] * 20, gz=True)
    corrupt.write_bytes(corrupt.read_bytes()[:-40])  # truncated gzip stream
    with pytest.raises(DataPrepError, match=f"{corrupt}: cannot read"):
        run(tmp_path, [str(corrupt)], tokenizer_dir=str(tokenizer_dir))
    from transformers import AutoTokenizer

    no_eos = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    no_eos.eos_token = None
    no_eos.save_pretrained(tmp_path / "no_eos")
    data = write_jsonl(tmp_path / "d.jsonl", [{"target": "x"}])
    with pytest.raises(DataPrepError, match="has no EOS token"):
        run(tmp_path, [str(data)], tokenizer_dir=str(tmp_path / "no_eos"))
    assert not (tmp_path / "out").exists()


def test_refuses_to_overwrite_and_overwrite_replaces(tmp_path, tokenizer_dir):
    data = write_jsonl(tmp_path / "d.jsonl", synthetic_records()[:3])
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(DataPrepError, match="not empty; pass --overwrite"):
        run(tmp_path, [str(data)], tokenizer_dir=str(tokenizer_dir))
    assert os.listdir(out) == ["precious.txt"]
    _, manifest = run(tmp_path, [str(data)], tokenizer_dir=str(tokenizer_dir), overwrite=True)
    assert not (out / "precious.txt").exists() and (out / "manifest.json").exists()
    assert sorted(os.listdir(tmp_path)) == ["d.jsonl", "out"]  # no temporary or old copy left
    # a failing --overwrite run leaves the previous output as it was
    bad = write_jsonl(tmp_path / "bad" / "x.jsonl", ['{"target": "ok"}', "oops"])
    with pytest.raises(DataPrepError, match=f"{bad}:2: invalid JSON"):
        run(tmp_path, [str(bad)], tokenizer_dir=str(tokenizer_dir), overwrite=True)
    assert read_manifest(out) == manifest


def test_cli_write_jsonl_and_refusal(tmp_path, tokenizer_dir, corpus):
    d, _ = corpus
    out = tmp_path / "cli-out"
    cmd = [
        sys.executable,
        str(ROOT / "data_prep" / "prepare_pretrain_dataset.py"),
        "--data_input_dirs",
        str(d),
        "--tokenizer_dir",
        str(tokenizer_dir),
        "--data_output_dirs",
        str(out),
        "--max_length",
        str(L),
        "--num_spliced_dataset_bins",
        "2",
        "--num_proc",
        "2",
        "--write_jsonl",
        "--no_progress",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "part-00001" in proc.stdout and "total" in proc.stdout
    manifest = read_manifest(out)
    assert manifest["command"].startswith("python data_prep/prepare_pretrain_dataset.py --data_input_dirs")
    from transformers import AutoTokenizer

    # the fingerprint computed in another process is the same
    assert manifest["tokenizer"] == tokenizer_fingerprint(AutoTokenizer.from_pretrained(str(tokenizer_dir)))
    for part in manifest["parts"]:
        rows = [json.loads(line) for line in (out / "jsonl" / f"{part['name']}.jsonl").read_text().splitlines()]
        assert rows == load_from_disk(str(out / "arrow" / part["name"])).to_list()
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 2 and "pass --overwrite" in again.stderr

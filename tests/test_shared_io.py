"""What every tool shares: one record reader (the same text for the same record in data preparation, vocabulary
counting, calibration and the report), one atomic publication helper, one definition of each shared constant."""

import gzip
import json
import os
import stat
from pathlib import Path

import pytest

from colossal_shear import report
from colossal_shear.bundled import corpus_files, corpus_records, corpus_texts
from colossal_shear.core import constants, fsutil
from colossal_shear.data.prepare import _line_batches
from colossal_shear.data.records import AMBIGUOUS_TEXT, DataPrepError, Record, RecordError, iter_texts
from colossal_shear.data.tokenization import DocumentTokenizer, set_worker_tokenizer, tokenize_lines
from colossal_shear.pruning import oneshot
from colossal_shear.vocab import VocabError
from colossal_shear.vocab import resize as embeddings
from colossal_shear.vocab.corpus import iter_corpus

# (record, source, target): what each record means under the one rule
RECORDS = [
    ({"text": "a target-only record", "category": "en"}, "", "a target-only record"),
    ({"source": "Q: 2+2? ", "target": "A: 4", "category": "qa"}, "Q: 2+2? ", "A: 4"),
    ({"source": "Translate: ", "text": "你好", "category": "zh"}, "Translate: ", "你好"),  # text = target
    ({"source": None, "target": "no source, no category"}, "", "no source, no category"),
    ({"target": "", "source": "an empty target"}, "an empty target", ""),
    ({"target": "other keys are ignored", "id": 7, "category": ""}, "", "other keys are ignored"),
]
TEXTS = [s + t for _, s, t in RECORDS]
AMBIGUOUS = {"text": "a", "target": "b"}


def write_jsonl(path: Path, records, gz=False) -> Path:
    data = ("\ufeff" + "\n\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n").encode()
    path.write_bytes(gzip.compress(data) if gz else data)  # a byte-order mark and blank lines, as users have
    return path


def data_prep_documents(path: Path, tok):
    """What data preparation's workers make of `path`: (ids, categories), through its real reading path."""
    doc_tok = DocumentTokenizer(tok)
    set_worker_tokenizer(doc_tok)
    try:
        ids, cats = [], []
        for task, _ in _line_batches([path], batch_lines=2):
            batch = tokenize_lines(task)
            if batch.errors:
                raise batch.errors[0]
            ids += batch.ids.tolist()
            cats += batch.categories
        return ids, cats
    finally:
        set_worker_tokenizer(None)


def report_texts(path: Path, tmp_path: Path, monkeypatch) -> list[str]:
    seen = []
    monkeypatch.setattr(report, "tokens_per_char", lambda tok, texts: seen.extend(texts) or 1.0)
    report.make_report(tmp_path / "no-tb", tmp_path / "report", tokenizers={"t": "unused"}, eval_texts=path)
    return seen


def consumer_texts(path: Path, tmp_path: Path, monkeypatch) -> dict[str, list[str]]:
    return {
        "vocabulary counting": [r.text for r in iter_corpus([path])],
        "calibration": list(oneshot.calibration_texts(path)),
        "report": report_texts(path, tmp_path, monkeypatch),
    }


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
def test_one_reader_same_text_everywhere(tmp_path, tokenizer_dir, monkeypatch, gz):
    from transformers import AutoTokenizer

    path = write_jsonl(tmp_path / ("in.jsonl.gz" if gz else "in.jsonl"), [r for r, _, _ in RECORDS], gz=gz)
    for name, texts in consumer_texts(path, tmp_path, monkeypatch).items():
        assert texts == TEXTS, name
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    ids, cats = data_prep_documents(path, tok)
    expected, _, _ = DocumentTokenizer(tok).documents([Record(s, t, None) for _, s, t in RECORDS])
    assert ids == expected.tolist()  # data preparation splits each record into the same source and target
    assert cats == ["en", "qa", "zh", "unknown", "unknown", "unknown"]
    assert [(t.category, t.line) for t in iter_texts(path)] == [
        ("en", 1),
        ("qa", 3),
        ("zh", 5),
        (None, 7),
        (None, 9),
        (None, 11),
    ]


def test_the_bundled_corpus_reads_the_same(tmp_path):
    expected = [r.get("source", "") + r["target"] for r in corpus_records()]
    assert list(corpus_texts()) == expected
    assert list(oneshot.calibration_texts(None)) == expected
    assert [r.text for r in iter_corpus(corpus_files())] == expected


def test_plain_text_reads_the_same_everywhere(tmp_path, monkeypatch):
    path = tmp_path / "notes.txt"
    lines = [f"line {i}\n" for i in range(40)]
    path.write_text("".join(lines), encoding="utf-8")
    blocks = ["".join(lines[:32]), "".join(lines[32:])]
    for name, texts in consumer_texts(path, tmp_path, monkeypatch).items():
        assert texts == blocks, name


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
def test_ambiguous_record_is_an_error_everywhere(tmp_path, tokenizer_dir, monkeypatch, gz):
    from transformers import AutoTokenizer

    path = write_jsonl(tmp_path / ("amb.jsonl.gz" if gz else "amb.jsonl"), [RECORDS[0][0], AMBIGUOUS], gz=gz)
    message = f"{path}:3: ambiguous record: both 'text' and 'target' are given (field 'text')"
    with pytest.raises(RecordError) as err:
        data_prep_documents(path, AutoTokenizer.from_pretrained(tokenizer_dir))
    assert str(err.value).startswith(message) and err.value.reason == AMBIGUOUS_TEXT
    with pytest.raises(VocabError) as verr:
        list(iter_corpus([path]))
    assert str(verr.value).startswith(message)
    for read in (lambda: list(oneshot.calibration_texts(path)), lambda: report_texts(path, tmp_path, monkeypatch)):
        with pytest.raises(ValueError) as e:
            read()
        assert str(e.value).startswith(message)


def test_bad_files_name_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"target": "ok"}\n{"source": "only"}\n', encoding="utf-8")
    with pytest.raises(DataPrepError, match=r"bad.jsonl:2: missing field \(field 'target'; or give 'text'\)"):
        list(oneshot.calibration_texts(bad))
    latin = tmp_path / "latin.txt"
    latin.write_bytes("ok\ncaf\xe9\n".encode("latin-1"))
    with pytest.raises(VocabError, match=r"latin.txt:2: invalid UTF-8"):
        list(iter_corpus([latin]))
    broken = tmp_path / "broken.jsonl.gz"
    broken.write_bytes(gzip.compress(b'{"target": "x"}\n' * 1000)[:-30])
    with pytest.raises(VocabError, match="broken.jsonl.gz: cannot read"):
        list(iter_corpus([broken]))


# ------------------------------------------------------------------------------------------- atomic publication
def leftovers(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


def build(tmp: Path, content: str) -> None:
    (tmp / "sub").mkdir()
    (tmp / "sub" / "f.txt").write_text(content)
    (tmp / "data.bin").write_bytes(content.encode())


def test_publish_creates_and_refuses_or_replaces(tmp_path):
    out = tmp_path / "deep" / "out"
    with fsutil.atomic_dir(out) as tmp:
        assert tmp.parent == out.parent and tmp.name.startswith(".out.tmp-")
        build(tmp, "one")
    assert (out / "sub" / "f.txt").read_text() == "one" and not leftovers(out.parent, "out")
    with pytest.raises(FileExistsError, match="exists and is not empty"), fsutil.atomic_dir(out) as tmp:
        build(tmp, "two")
    assert (out / "sub" / "f.txt").read_text() == "one" and not leftovers(out.parent, "out")
    with fsutil.atomic_dir(out, overwrite=True) as tmp:
        build(tmp, "three")
    assert (out / "sub" / "f.txt").read_text() == "three" and not leftovers(out.parent, "out")
    with fsutil.atomic_dir(out, keep_existing=True) as tmp:  # built meanwhile by someone else: theirs stays
        build(tmp, "four")
    assert (out / "sub" / "f.txt").read_text() == "three" and not leftovers(out.parent, "out")
    empty = tmp_path / "empty"
    empty.mkdir()
    with fsutil.atomic_dir(empty) as tmp:  # an empty directory stands for nothing
        build(tmp, "five")
    assert (empty / "data.bin").read_bytes() == b"five"


@pytest.mark.parametrize("overwrite", [False, True])
def test_an_error_while_writing_leaves_the_old_target_and_no_temporary(tmp_path, overwrite):
    out = tmp_path / "out"
    with fsutil.atomic_dir(out) as tmp:
        build(tmp, "old")
    with pytest.raises(KeyboardInterrupt), fsutil.atomic_dir(out, overwrite=overwrite) as tmp:
        build(tmp, "new")
        raise KeyboardInterrupt
    assert (out / "sub" / "f.txt").read_text() == "old" and not leftovers(tmp_path, "out")
    with pytest.raises(RuntimeError), fsutil.atomic_dir(tmp_path / "never") as tmp:
        raise RuntimeError("bad input found late")
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_a_failing_swap_rolls_back(tmp_path, monkeypatch):
    out = tmp_path / "out"
    with fsutil.atomic_dir(out) as tmp:
        build(tmp, "old")
    real_rename = os.rename

    def rename(src, dst):
        if Path(src).name.startswith(".out.tmp-"):
            raise OSError(5, "simulated I/O error")
        real_rename(src, dst)

    monkeypatch.setattr(fsutil.os, "rename", rename)
    with pytest.raises(OSError, match="simulated"), fsutil.atomic_dir(out, overwrite=True) as tmp:
        build(tmp, "new")
    assert (out / "sub" / "f.txt").read_text() == "old" and not leftovers(tmp_path, "out")


def test_atomic_write_replaces_whole_or_not_at_all(tmp_path, monkeypatch):
    path = fsutil.atomic_write_text(tmp_path / "a" / "latest", "step-1")
    assert path.read_text() == "step-1"
    fsutil.atomic_write_bytes(path, b"step-2")
    assert path.read_bytes() == b"step-2"

    def fail(src, dst):
        raise OSError(28, "no space left")

    monkeypatch.setattr(fsutil.os, "replace", fail)
    with pytest.raises(OSError, match="no space"):
        fsutil.atomic_write_text(path, "step-3")
    assert path.read_text() == "step-2" and os.listdir(path.parent) == ["latest"]


@pytest.mark.parametrize("umask, dir_mode, file_mode", [(0o022, 0o755, 0o644), (0o027, 0o750, 0o640)])
def test_published_permissions_follow_the_umask(tmp_path, umask, dir_mode, file_mode):
    src = tmp_path / "src"
    src.mkdir()
    (src / "tokenizer.json").write_text("{}")
    (src / "tokenizer.json").chmod(0o600)  # a private source file: the copy still gets the umask's mode
    out = tmp_path / "out"
    old = os.umask(umask)
    try:
        assert fsutil.current_umask() == umask
        with fsutil.atomic_dir(out) as tmp:
            build(tmp, "x")
        with fsutil.atomic_dir(out, overwrite=True) as tmp:  # a replacement too
            build(tmp, "y")
            assert fsutil.copy_tokenizer_files(src, tmp) == ["tokenizer.json"]
        latest = fsutil.atomic_write_text(out / "latest", "step-1")
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(out) == dir_mode and mode(out / "sub") == dir_mode
    for f in (out / "data.bin", out / "sub" / "f.txt", out / "tokenizer.json", latest):
        assert mode(f) == file_mode, f


# ------------------------------------------------------------------------------------------- shared constants
def test_each_shared_constant_is_defined_once():
    import torch

    assert embeddings.DTYPES is constants.DTYPES and oneshot.DTYPES is constants.DTYPES
    assert constants.DTYPES["bf16"] is torch.bfloat16 and constants.DTYPES["float32"] is torch.float32
    assert all(p in constants.DTYPES for p in constants.PRECISIONS)
    assert set(constants.TOKENIZER_CONFIG_FILES) < set(constants.TOKENIZER_FILES)

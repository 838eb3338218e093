"""Data preparation reads corpora as they ship (issue 25): every format gives the dataset that the same records in
plain JSONL give, byte for byte; splitting into units changes nothing; errors name the file and the line or row.

Real files everywhere: gzip/bz2/xz from the standard library, zstd and Parquet written by pyarrow, `datasets`
directories by `Dataset.save_to_disk`.
"""

import bz2
import gzip
import json
import lzma
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_data_prep import bundled_records, data_bytes, run, synthetic_records, write_jsonl

from colossal_shear.data import DataPrepError

RECORDS = bundled_records(3) + synthetic_records()


def jsonl_bytes(records) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()


def write_compressed(path: Path, records, codec: str) -> Path:
    data = jsonl_bytes(records)
    if codec == "zstd":
        half = len(data) // 2
        cut = data.index(b"\n", half) + 1
        with open(path, "wb") as f:  # two zstd frames back to back, as concatenated shards are
            for piece in (data[:cut], data[cut:]):
                sink = pa.BufferOutputStream()
                with pa.CompressedOutputStream(sink, "zstd") as z:
                    z.write(piece)
                f.write(sink.getvalue().to_pybytes())
    else:
        path.write_bytes({"bz2": bz2.compress, "xz": lzma.compress}[codec](data))
    return path


def table(records) -> pa.Table:
    cols = ["source", "target", "text", "category"]
    return pa.table({c: pa.array([r.get(c) for r in records], pa.string()) for c in cols})


def without_paths(manifest: dict) -> dict:
    return {k: v for k, v in manifest.items() if k not in ("command", "inputs")}


@pytest.fixture(scope="module")
def reference(tokenizer_dir, tmp_path_factory):
    """The records as one plain JSONL file, in one unit."""
    d = tmp_path_factory.mktemp("ref")
    src = write_jsonl(d / "all.jsonl", RECORDS)
    out, manifest = run(d, [str(src)], tokenizer_dir=str(tokenizer_dir))
    return data_bytes(out), manifest


def make_input(kind: str, d: Path) -> list[str]:
    d.mkdir(parents=True, exist_ok=True)
    half = len(RECORDS) // 2
    if kind == "zst":
        return [str(write_compressed(d / "a.jsonl.zst", RECORDS, "zstd"))]
    if kind == "bz2+xz":  # Dolma-like .json names, .ndjson; one directory holding both, read in name order
        write_compressed(d / "a.json.bz2", RECORDS[:half], "bz2")
        write_compressed(d / "b.ndjson.xz", RECORDS[half:], "xz")
        return [str(d)]
    if kind == "spellings":  # every JSON Lines spelling other tools write, any case, beside files that are not inputs
        cut = [len(RECORDS) * k // 6 for k in range(7)]
        for k, name in enumerate(["A.JSONL", "b.jsonl.gz", "c.ndjson", "d.NDJSON.GZ", "e.json", "f.json.gz"]):
            data = jsonl_bytes(RECORDS[cut[k] : cut[k + 1]])
            (d / name).write_bytes(gzip.compress(data) if name.lower().endswith(".gz") else data)
        (d / "g.json").write_text(json.dumps([{"target": "a JSON array"}]))
        (d / "h.json").write_text(json.dumps({"target": "pretty-printed"}, indent=1))
        (d / "notes.txt").write_text("not an input")
        (d / ".hidden.jsonl").write_text('{"target": "hidden names are not read"}')
        (d / "sub").mkdir()
        (d / "sub" / "x.jsonl").write_text('{"target": "not read recursively"}')
        return [str(d)]
    if kind == "parquet":  # small row groups: several units per file
        pq.write_table(table(RECORDS[:half]), d / "0.parquet", row_group_size=4)
        pq.write_table(table(RECORDS[half:]), d / "1.parquet", row_group_size=5)
        return [str(d)]
    if kind == "datasets":  # a DatasetDict: its splits in order, each of two Arrow shards
        from datasets import Dataset, DatasetDict

        dd = DatasetDict({"train": Dataset(table(RECORDS[:half])), "extra": Dataset(table(RECORDS[half:]))})
        dd.save_to_disk(str(d / "dd"), num_shards={"train": 2, "extra": 2})
        return [str(d / "dd")]
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["zst", "bz2+xz", "spellings", "parquet", "datasets"])
def test_each_format_gives_the_jsonl_dataset(kind, reference, tokenizer_dir, tmp_path):
    ref_bytes, ref_manifest = reference
    out, manifest = run(
        tmp_path, make_input(kind, tmp_path / "in"), tokenizer_dir=str(tokenizer_dir), num_proc=2, batch_lines=3
    )
    assert data_bytes(out) == ref_bytes
    assert without_paths(manifest) == without_paths(ref_manifest)
    assert sum(i["records"] for i in manifest["inputs"]) == len(RECORDS)


def test_a_directory_names_what_it_skips(tmp_path, capsys):
    """Files that are not inputs (another suffix, a `.json` that is a JSON document, a subdirectory) are named in
    one warning line; hidden names are passed over silently."""
    from colossal_shear.data.records import discover_inputs

    make_input("spellings", tmp_path)
    capsys.readouterr()
    found = [p.name for p in discover_inputs([str(tmp_path)])]
    assert found == ["A.JSONL", "b.jsonl.gz", "c.ndjson", "d.NDJSON.GZ", "e.json", "f.json.gz"]
    assert capsys.readouterr().err.splitlines() == [
        f"prepare_dataset: {tmp_path}: skipped 4 entries that are not inputs (not read recursively; see "
        "docs/data_prep.md, Formats): g.json (a JSON document, not JSON Lines), h.json (a JSON document, not JSON "
        "Lines), notes.txt, sub/"
    ]


def test_byte_ranges_of_a_plain_file_change_nothing(reference, tokenizer_dir, tmp_path):
    """A plain JSONL file cut into many byte-range units (some lines longer than a unit) gives the same bytes."""
    ref_bytes, ref_manifest = reference
    src = write_jsonl(tmp_path / "all.jsonl", RECORDS)
    out, manifest = run(tmp_path, [str(src)], tokenizer_dir=str(tokenizer_dir), num_proc=2, unit_bytes=700)
    assert data_bytes(out) == ref_bytes and without_paths(manifest) == without_paths(ref_manifest)
    assert manifest["inputs"][0]["lines"] == len(RECORDS)


def test_text_field_names_the_text_column(tokenizer_dir, tmp_path, reference):
    ref_bytes, _ = reference
    rows = [
        {
            "content": r.get("target", r.get("text")),
            "source": r.get("source"),
            "category": r.get("category"),
            "text": "ignored when --text_field is given",
        }
        for r in RECORDS
    ]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "c.parquet", row_group_size=6)
    out, _ = run(tmp_path, [str(tmp_path / "c.parquet")], tokenizer_dir=str(tokenizer_dir), text_field="content")
    assert data_bytes(out) == ref_bytes
    pq.write_table(pa.table({"content": ["x"], "id": [1]}), tmp_path / "d.parquet")
    with pytest.raises(
        DataPrepError,
        match=r"d\.parquet: no 'target' or 'text' column; its columns: content, id "
        r"\(name the text column with --text_field\)",
    ):
        run(tmp_path, [str(tmp_path / "d.parquet")], name="o2", tokenizer_dir=str(tokenizer_dir))


def test_errors_name_the_line_of_the_file_and_the_row_of_a_table(tokenizer_dir, tmp_path):
    lines = [json.dumps({"target": f"record number {i}"}) for i in range(40)]
    lines[33] = '{"target": 7}'
    src = tmp_path / "big.jsonl"
    src.write_text("\n".join(lines) + "\n")
    # unit_bytes 100: line 34 is deep inside a byte range that starts mid-file
    with pytest.raises(DataPrepError, match=rf"^{src}:34: expected a string, got number \(field 'target'\)$"):
        run(tmp_path, [str(src)], tokenizer_dir=str(tokenizer_dir), unit_bytes=100, num_proc=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.jsonl"]  # no output, no work directory left
    rows = [{"target": f"row {i}"} for i in range(12)]
    rows[9] = {"target": None}
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "t.parquet", row_group_size=4)
    with pytest.raises(DataPrepError, match=rf"^{tmp_path / 't.parquet'}:10: missing field \(field 'target'"):
        run(tmp_path, [str(tmp_path / "t.parquet")], tokenizer_dir=str(tokenizer_dir))
    _, manifest = run(tmp_path, [str(tmp_path / "t.parquet")], tokenizer_dir=str(tokenizer_dir), skip_invalid=True)
    assert manifest["skipped"] == {"missing_field": 1} and manifest["inputs"][0]["lines"] == 12


def test_corrupt_compressed_inputs_are_named(tokenizer_dir, tmp_path):
    z = write_compressed(tmp_path / "z.jsonl.zst", [{"target": "x" * 3000}] * 30, "zstd")
    z.write_bytes(z.read_bytes()[:-30])
    with pytest.raises(DataPrepError, match=f"{z}: cannot read"):
        run(tmp_path, [str(z)], tokenizer_dir=str(tokenizer_dir))
    x = tmp_path / "x.jsonl.xz"
    x.write_bytes(b"not xz at all")
    with pytest.raises(DataPrepError, match=f"{x}: cannot read"):
        run(tmp_path, [str(x)], tokenizer_dir=str(tokenizer_dir))
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"PAR1 nonsense")
    with pytest.raises(DataPrepError, match=f"{bad}: cannot read as Parquet"):
        run(tmp_path, [str(bad)], tokenizer_dir=str(tokenizer_dir))

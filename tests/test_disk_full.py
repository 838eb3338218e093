"""A full disk is one line in every CLI (issue 23): `cli.run` turns ENOSPC/EDQUOT into `<prog>: error: <what> failed:
No space left on device (in <file>): <written> written before the file system filled up; <free> free there now`,
exit 2, and nothing half-written is left (atomic_dir removes its temporary directory; data preparation keeps only
complete units, to resume). Real tmpfs file systems too small for each output (root only, `small_fs`); each CLI's
`main` runs in this process, so the real writers (safetensors, tokenizers, sentencepiece, pyarrow) meet the full
disk."""

import importlib.util
import re

import pytest
from conftest import ROOT

from colossal_shear.bundled import corpus_files


def script_main(rel: str):
    spec = importlib.util.spec_from_file_location(rel.replace("/", "_")[:-3], ROOT / rel)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


def leftovers(disk):
    """Every file left on the disk, relative; only data preparation's complete units (to resume) may stay."""
    return sorted(str(p.relative_to(disk)) for p in disk.rglob("*") if p.is_file())


UNIT_FILE = re.compile(r"\.out\.work/(state\.json|units/u-\d{7}\.(arrow|json))")

CASES = {  # script -> (tmpfs bytes, arguments writing to DISK/out)
    "tokenizer/init_tokenizer.py": (
        64 << 10,
        lambda words, tok, model: ["--source_tokenizer_dir", tok, "--expand_tokens_file", words, "--num_workers", 1],
        "--target_tokenizer_dir",
    ),
    "tokenizer/init_model.py": (
        1 << 20,
        lambda words, tok, model: ["--source_model_and_tokenizer_path", model, "--target_tokenizer_path", tok],
        "--target_model_path",
    ),
    "prune.py": (
        512 << 10,
        lambda words, tok, model: ["--method", "depth", "--pretrained", model, "--keep_layers", "0,2,3"],
        "--output_dir",
    ),
    "data_prep/prepare_pretrain_dataset.py": (
        256 << 10,
        lambda words, tok, model: [
            "--data_input_dirs",
            ",".join(map(str, corpus_files())),
            "--tokenizer_dir",
            tok,
            "--max_length",
            64,
            "--num_proc",
            1,
            "--no_progress",
        ],
        "--data_output_dirs",
    ),
}


@pytest.mark.parametrize("script", list(CASES))
def test_a_full_disk_is_one_line_exit_2_and_nothing_half_written(
    script, small_fs, tokenizer_dir, model_dir, tmp_path, capsys
):
    words = tmp_path / "words.txt"
    words.write_text("人工智能\n深度学习\n", encoding="utf-8")
    size, args, out_flag = CASES[script]
    disk = small_fs("disk", size)
    out = disk / "out"
    main = script_main(script)
    capsys.readouterr()
    assert main([*map(str, args(words, tokenizer_dir, model_dir)), out_flag, str(out)]) == 2
    err = capsys.readouterr().err
    prog = script.rsplit("/", 1)[-1]
    assert err.count("\n") == 1 and err.startswith(f"{prog}: error: "), err
    assert "failed: No space left on device (in " in err and str(disk) in err, err
    assert "written before the file system filled up" in err and "free there now" in err, err
    assert not out.exists()
    assert all(UNIT_FILE.fullmatch(f) for f in leftovers(disk)), leftovers(disk)
    if script.startswith("data_prep"):
        assert ("are kept in" in err) == bool(leftovers(disk)), err

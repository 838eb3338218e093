"""The typed configuration of data preparation; the CLI flags map one to one onto its fields."""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass, fields

from colossal_shear.core.config import option


def default_num_proc() -> int:
    """The cores this process may use, shared among the processes a launcher started on this host (torchrun's
    LOCAL_WORLD_SIZE)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    per_host = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return max(1, cores // max(1, per_host))


@dataclass
class PrepareConfig:
    """JSONL records (source, target, category) -> packed, loss-masked, bucketed Arrow parts + manifest.json.
    Flag names of Colossal-LLaMA-2's script are kept where they exist."""

    data_input_dirs: list[str] = option(
        help="directories of input files (JSON Lines plain or compressed, Parquet; "
        "not recursive), single files and datasets save_to_disk directories, "
        "comma-separated or space-separated",
        sep=",",
    )
    tokenizer_dir: str = option(help="Hugging Face tokenizer directory (must define EOS)")
    data_output_dirs: str = option(help="the one output directory (arrow/part-XXXXX, manifest.json)")
    max_length: int = option(4096, "tokens per packed sequence")
    num_spliced_dataset_bins: int = option(10, "bins per category; part k holds bin k of every category")
    num_proc: int = option(
        help="tokenisation processes (1: in this process)",
        default_factory=default_num_proc,
        default_text="the cores this process may use (divided by LOCAL_WORLD_SIZE)",
    )
    seed: int = option(42, "seed of the bin assignment and shuffles")
    write_jsonl: bool = option(False, "also write jsonl/part-XXXXX.jsonl")
    skip_invalid: bool = option(False, "skip bad lines and count them per reason in the manifest instead of stopping")
    overwrite: bool = option(False, "replace an existing non-empty output directory")
    buffer_size: int = option(1024, "packed sequences held in memory before spilling to disk")
    batch_lines: int = option(256, "input lines (or rows) per tokenisation batch")
    text_field: str | None = option(
        None,
        "the name of the text field or column when it is not 'target' or 'text' "
        "(e.g. content); 'target' and 'text' are then ignored",
    )
    unit_bytes: int = option(
        32 << 20,
        "at most this many bytes of a plain JSON Lines file per unit of work (fewer "
        "when that makes < 64 units, down to 1 MiB); a compressed file is one unit, "
        "a Parquet row group is one",
    )
    shard_index: int | None = option(
        None,
        "this host's shard: it takes units i with i mod num_shards == "
        "shard_index (default: RANK of a launcher, else 0)",
    )
    num_shards: int | None = option(None, "hosts sharing the work (default: WORLD_SIZE of a launcher, else 1)")
    progress: bool = option(True, "progress bars on stderr")
    merge_shards: bool = option(
        False,
        "shard 0 waits for the other shards and merges (set by the CLI when the ranks come from a launcher)",
        cli=False,
    )
    command: str | None = option(
        None, "the command recorded in the manifest (default: the equivalent CLI command)", cli=False
    )

    def __post_init__(self):
        if isinstance(self.data_input_dirs, (str, os.PathLike)):
            self.data_input_dirs = split_paths(os.fspath(self.data_input_dirs))
        else:
            self.data_input_dirs = [os.fspath(p) for p in self.data_input_dirs]
        self.tokenizer_dir = os.fspath(self.tokenizer_dir)
        self.data_output_dirs = os.fspath(self.data_output_dirs)
        for name, low in (
            ("max_length", 2),
            ("num_spliced_dataset_bins", 1),
            ("num_proc", 1),
            ("buffer_size", 1),
            ("batch_lines", 1),
            ("unit_bytes", 1),
            ("shard_index", 0),
            ("num_shards", 1),
        ):
            value = getattr(self, name)
            if value is None and name in ("shard_index", "num_shards"):
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if (self.shard_index is None) != (self.num_shards is None):
            raise ValueError("give both shard_index and num_shards, or neither")
        if self.num_shards is not None and self.shard_index >= self.num_shards:
            raise ValueError(f"shard_index must be < num_shards ({self.num_shards}), got {self.shard_index}")

    def shard(self) -> tuple[int, int]:
        """(this shard, number of shards)."""
        return (self.shard_index or 0, self.num_shards or 1)

    def settings(self) -> dict:
        """The options the result depends on (a resume refuses a change of any of them); not num_proc, batch_lines,
        buffer_size, the shard, overwrite or progress, which change nothing in the result."""
        keep = (
            "max_length",
            "num_spliced_dataset_bins",
            "seed",
            "write_jsonl",
            "skip_invalid",
            "text_field",
            "unit_bytes",
        )
        return {k: getattr(self, k) for k in keep}

    def to_argv(self) -> list[str]:
        """The CLI arguments that reproduce this configuration."""
        argv = ["data_prep/prepare_pretrain_dataset.py"]
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("command", "progress", "merge_shards", "shard_index", "num_shards") or value is None:
                continue
            if isinstance(value, bool):
                if value:
                    argv.append(f"--{f.name}")
            elif isinstance(value, list):
                argv += [f"--{f.name}", ",".join(value)]
            else:
                argv += [f"--{f.name}", str(value)]
        return argv

    def command_line(self) -> str:
        return self.command if self.command is not None else "python " + shlex.join(self.to_argv())


def split_paths(value: str) -> list[str]:
    return [p.strip() for p in value.split(",") if p.strip()]

"""The typed configuration of data preparation; the CLI flags map one to one onto its fields."""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass, field, fields


def default_num_proc() -> int:
    return max(1, min(4, os.cpu_count() or 1))


@dataclass
class PrepareConfig:
    """Field names are the flag names of data_prep/prepare_pretrain_dataset.py (Colossal-LLaMA-2's where they exist)."""

    data_input_dirs: list[str]  # directories of .jsonl / .jsonl.gz files, or single files
    tokenizer_dir: str  # a Hugging Face tokenizer directory (or hub id); must have an EOS token
    data_output_dirs: str  # the one output directory (arrow/, manifest.json, jsonl/)
    max_length: int = 4096  # tokens per packed sequence
    num_spliced_dataset_bins: int = 10  # bins per category = parts (buckets), at most
    num_proc: int = field(default_factory=default_num_proc)  # tokenisation processes (1: in this process)
    seed: int = 42  # bin assignment and shuffling inside each part
    write_jsonl: bool = False  # also write <out>/jsonl/part-XXXXX.jsonl
    skip_invalid: bool = False  # skip bad lines and count them per reason, instead of stopping at the first
    overwrite: bool = False  # replace an existing, non-empty output directory
    buffer_size: int = 1024  # packed sequences held in memory before they are spilled to disk
    batch_lines: int = 256  # input lines per tokenisation task
    progress: bool = True  # progress bars on stderr
    command: str | None = None  # recorded in the manifest; defaults to the equivalent CLI command

    def __post_init__(self):
        if isinstance(self.data_input_dirs, (str, os.PathLike)):
            self.data_input_dirs = split_paths(os.fspath(self.data_input_dirs))
        else:
            self.data_input_dirs = [os.fspath(p) for p in self.data_input_dirs]
        self.tokenizer_dir = os.fspath(self.tokenizer_dir)
        self.data_output_dirs = os.fspath(self.data_output_dirs)
        for name, low in (("max_length", 2), ("num_spliced_dataset_bins", 1), ("num_proc", 1), ("buffer_size", 1),
                          ("batch_lines", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")

    def to_argv(self) -> list[str]:
        """The CLI arguments that reproduce this configuration."""
        argv = ["data_prep/prepare_pretrain_dataset.py"]
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("command", "progress"):
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

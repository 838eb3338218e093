"""The typed configuration of data preparation; the CLI flags map one to one onto its fields."""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass, fields

from colossal_shear.core.config import option


def default_num_proc() -> int:
    return max(1, min(4, os.cpu_count() or 1))


@dataclass
class PrepareConfig:
    """JSONL records (source, target, category) -> packed, loss-masked, bucketed Arrow parts + manifest.json.
    Flag names of Colossal-LLaMA-2's script are kept where they exist."""

    data_input_dirs: list[str] = option(
        help="directories of .jsonl/.jsonl.gz files (not recursive) and/or single "
        "files, comma-separated or space-separated",
        sep=",",
    )
    tokenizer_dir: str = option(help="Hugging Face tokenizer directory (must define EOS)")
    data_output_dirs: str = option(help="the one output directory (arrow/part-XXXXX, manifest.json)")
    max_length: int = option(4096, "tokens per packed sequence")
    num_spliced_dataset_bins: int = option(10, "bins per category; part k holds bin k of every category")
    num_proc: int = option(
        help="tokenisation processes (1: in this process)",
        default_factory=default_num_proc,
        default_text="the machine's cores, at most 4",
    )
    seed: int = option(42, "seed of the bin assignment and shuffles")
    write_jsonl: bool = option(False, "also write jsonl/part-XXXXX.jsonl")
    skip_invalid: bool = option(False, "skip bad lines and count them per reason in the manifest instead of stopping")
    overwrite: bool = option(False, "replace an existing non-empty output directory")
    buffer_size: int = option(1024, "packed sequences held in memory before spilling to disk")
    batch_lines: int = option(256, "input lines per tokenisation task")
    progress: bool = option(True, "progress bars on stderr")
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
        ):
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

"""What the SentencePiece and the Hugging Face fast editors share: the result types and the tokenizer-config files."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from colossal_shear.core.constants import TOKENIZER_CONFIG_FILES
from colossal_shear.core.errors import VocabError


@dataclass
class ExpandResult:
    added: list[str] = field(default_factory=list)  # requested pieces, in id order
    intermediates: list[str] = field(default_factory=list)  # pieces added so that BPE can build requested ones
    unreachable: list[str] = field(default_factory=list)  # requested pieces BPE will never produce (none by default)
    first_new_id: int = 0


def read_json(path: Path, what: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise VocabError(f"{path}:{e.lineno}: malformed {what} ({e.msg})") from None
    except OSError as e:
        raise VocabError(f"cannot read {what} {path}: {e.strerror or e}") from None


def write_json(path: Path, obj, indent: int | None = 2) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=indent)
        f.write("\n")


def source_added_tokens(source_dir: Path) -> dict[int, dict]:
    """Added tokens declared by the source's config files: {id: {"content": str, "special": bool, ...}}."""
    out: dict[int, dict] = {}
    cfg_path = source_dir / "tokenizer_config.json"
    if cfg_path.exists():
        cfg = read_json(cfg_path, "tokenizer_config.json")
        for k, v in (cfg.get("added_tokens_decoder") or {}).items():
            out[int(k)] = dict(v)
    at_path = source_dir / "added_tokens.json"
    if at_path.exists():
        for content, i in read_json(at_path, "added_tokens.json").items():
            out.setdefault(int(i), {"content": content, "special": False})
    tj_path = source_dir / "tokenizer.json"
    if tj_path.exists():
        for tok in read_json(tj_path, "tokenizer.json").get("added_tokens", []):
            entry = {k: v for k, v in tok.items() if k != "id"}
            out.setdefault(int(tok["id"]), entry)
    return out


def copy_configs(source_dir: Path, tmp: Path, id_map: dict[int, int] | None) -> None:
    """Copy the tokenizer config files, renumbering the ids they mention (pruning); settings are kept verbatim."""
    for name in TOKENIZER_CONFIG_FILES:
        src = source_dir / name
        if not src.exists():
            continue
        obj = read_json(src, name)
        write_json(tmp / name, _renumbered(name, obj, id_map) if id_map is not None else obj)


def _renumbered(name: str, obj: dict, id_map: dict[int, int]) -> dict:
    """A tokenizer config file's content with the ids it mentions renumbered (tokens without a new id dropped)."""
    if name == "tokenizer_config.json" and "added_tokens_decoder" in obj:
        obj["added_tokens_decoder"] = {
            str(id_map[int(k)]): v for k, v in obj["added_tokens_decoder"].items() if int(k) in id_map
        }
    elif name == "added_tokens.json":
        obj = {c: id_map[int(i)] for c, i in obj.items() if int(i) in id_map}
    return obj

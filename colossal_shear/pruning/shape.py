"""Target shapes for structured pruning: what a pruned LLaMA-style model keeps.

A shape is five numbers: hidden size, query heads, layers, MLP intermediate size and KV heads. The head dimension is
never pruned: a pruned model keeps its source's `head_dim` (written explicitly into its config), so `hidden` need not
be a multiple of `heads`.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from colossal_shear.core.errors import UserError
from colossal_shear.models.base import head_dim_of

FIELDS = ("hidden", "heads", "layers", "intermediate", "kv_heads")


class PruneError(UserError, ValueError):
    """A target shape, calibration input or pruning option that cannot be used."""


@dataclass(frozen=True)
class PruneShape:
    hidden: int
    heads: int
    layers: int
    intermediate: int
    kv_heads: int

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, config) -> PruneShape:
        """The shape of a Hugging Face LlamaConfig (or a dict of its fields); kv_heads defaults to heads."""
        if isinstance(config, PruneShape):
            return config
        get = config.get if isinstance(config, dict) else (lambda k, d=None: getattr(config, k, d))
        heads = int(get("num_attention_heads"))
        kv = get("num_key_value_heads", None)
        return cls(
            hidden=int(get("hidden_size")),
            heads=heads,
            layers=int(get("num_hidden_layers")),
            intermediate=int(get("intermediate_size")),
            kv_heads=int(kv) if kv else heads,
        )

    @classmethod
    def parse(cls, text: str, source_config) -> PruneShape:
        """Read a target shape.

        `text` is either "hidden,heads,layers,intermediate[,kv_heads]" or a path to a config.json (or to a model
        directory holding one). Without kv_heads (or a config without num_key_value_heads):
          * a multi-head (non-GQA) source stays multi-head: kv_heads = heads;
          * a GQA source keeps its KV heads when they divide `heads` (query heads are pruned inside the groups);
          * otherwise it keeps its group size (heads per KV head), pruning whole groups: kv_heads = heads // group;
          * if neither divides, a ValueError asks for kv_heads explicitly.
        The result is not validated against the source: call `validate_against`.
        """
        source = cls.from_config(source_config)
        text = str(text).strip()
        path = Path(os.path.expanduser(text))
        if "," not in text or path.exists():
            if path.is_dir():
                path = path / "config.json"
            if not path.is_file():
                raise FileNotFoundError(
                    f"target shape {text!r}: neither 'hidden,heads,layers,intermediate[,kv_heads]' nor an existing "
                    "config.json / model directory"
                )
            with open(path, encoding="utf-8") as f:
                cfg = json.load(f)
            missing = [
                k
                for k in ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size")
                if k not in cfg
            ]
            if missing:
                raise PruneError(f"{path}: not a LLaMA-style config (missing {', '.join(missing)})")
            src_hd = None if isinstance(source_config, (dict, PruneShape)) else head_dim_of(source_config)
            if cfg.get("head_dim") and src_hd is not None and int(cfg["head_dim"]) != src_hd:
                raise PruneError(
                    f"{path}: head_dim {cfg['head_dim']} differs from the source's {src_hd} (pruning "
                    "keeps the head dimension)"
                )
            hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
            layers, inter = int(cfg["num_hidden_layers"]), int(cfg["intermediate_size"])
            kv = cfg.get("num_key_value_heads")
            kv = int(kv) if kv else None
        else:
            parts = [p.strip() for p in text.split(",")]
            if len(parts) not in (4, 5) or not all(p.lstrip("-").isdigit() for p in parts):
                raise PruneError(
                    f"target shape {text!r}: expected 'hidden,heads,layers,intermediate[,kv_heads]' "
                    "(4 or 5 integers) or a path to a config.json"
                )
            nums = [int(p) for p in parts]
            hidden, heads, layers, inter = nums[:4]
            kv = nums[4] if len(nums) == 5 else None
        if kv is None:
            kv = cls.default_kv_heads(source, heads)
        return cls(hidden=hidden, heads=heads, layers=layers, intermediate=inter, kv_heads=kv)

    @staticmethod
    def default_kv_heads(source: PruneShape, heads: int) -> int:
        if heads <= 0:
            raise PruneError(f"target heads must be positive, got {heads}")
        if source.kv_heads == source.heads:  # multi-head attention stays multi-head
            return heads
        if heads % source.kv_heads == 0:  # keep every KV group, prune query heads inside them
            return source.kv_heads
        group = source.heads // source.kv_heads
        if heads % group == 0:  # keep the group size, prune whole groups
            return heads // group
        raise PruneError(
            f"target heads {heads}: cannot choose kv_heads for a source with {source.heads} query heads "
            f"in {source.kv_heads} KV groups (neither {source.kv_heads} nor the group size {group} "
            "divides it): give it explicitly as the fifth number"
        )

    # ------------------------------------------------------------------ checks
    def validate_against(self, source: PruneShape) -> None:
        """Raise ValueError unless this shape can be cut out of `source`."""
        problems = []
        for name in FIELDS:
            v, s = getattr(self, name), getattr(source, name)
            if v <= 0:
                problems.append(f"{name} must be positive (got {v})")
            elif v > s:
                problems.append(f"{name} {v} is larger than the source's {s} (pruning only removes)")
        if self.heads > 0 and self.kv_heads > 0:
            if self.heads % self.kv_heads:
                problems.append(
                    f"heads {self.heads} is not divisible by kv_heads {self.kv_heads} (grouped-query "
                    "attention needs the same number of query heads per KV head)"
                )
            elif source.kv_heads > 0 and self.heads // self.kv_heads > source.heads // source.kv_heads:
                problems.append(
                    f"{self.heads // self.kv_heads} query heads per KV head is more than the source's "
                    f"{source.heads // source.kv_heads} (a KV group cannot gain query heads)"
                )
        if problems:
            raise PruneError(f"target shape {self.describe()} vs source {source.describe()}: " + "; ".join(problems))

    # ------------------------------------------------------------------ sizes
    def num_params(
        self, vocab_size: int, head_dim: int, tied: bool, attention_bias: bool = False, mlp_bias: bool = False
    ) -> int:
        """Parameters of a LLaMA model of this shape (embeddings, LM head unless tied, norms, attention, MLP)."""
        d, hd = self.hidden, head_dim
        attn = d * hd * (2 * self.heads + 2 * self.kv_heads)
        if attention_bias:
            attn += hd * (self.heads + 2 * self.kv_heads) + d
        mlp = 3 * d * self.intermediate + ((2 * self.intermediate + d) if mlp_bias else 0)
        per_layer = attn + mlp + 2 * d
        return vocab_size * d * (1 if tied else 2) + d + self.layers * per_layer

    def depth_of_same_size(self, source: PruneShape, vocab_size: int, head_dim: int, tied: bool) -> PruneShape:
        """The source's width with as many layers (at least one) as bring the parameter count closest to this
        shape's: what depth pruning keeps for a target given by its width (prune.py --method depth --match_params)."""
        want = self.num_params(vocab_size, head_dim, tied)
        shapes = [
            PruneShape(source.hidden, source.heads, n, source.intermediate, source.kv_heads)
            for n in range(1, source.layers + 1)
        ]
        return min(shapes, key=lambda s: abs(s.num_params(vocab_size, head_dim, tied) - want))

    def as_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        return (
            f"hidden={self.hidden} heads={self.heads} kv_heads={self.kv_heads} layers={self.layers} "
            f"intermediate={self.intermediate}"
        )

    def __str__(self) -> str:
        return f"{self.hidden},{self.heads},{self.layers},{self.intermediate},{self.kv_heads}"

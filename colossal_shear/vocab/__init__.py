"""Vocabulary adaptation: expand or prune a SentencePiece or Hugging Face fast (byte-level BPE) tokenizer.

Entry point: `init_tokenizer(TokenizerConfig(...))` (the library side of `tokenizer/init_tokenizer.py`).
Modules, by responsibility:
  corpus             corpora / eval files through data.records (the one record reader), errors as VocabError
  pieces             reading piece files; sorting candidates into added / duplicate / present / rejected
  bpe                reference BPE on single pieces: reachability of new pieces, derivations of kept ones
  sentencepiece_edit ModelProto editing (tokenizer.model) and regeneration of the Hugging Face files
  hf_fast_edit       tokenizer.json editing (vocabulary + merges)
  frequencies        streaming, multi-process token counts
  learn              learning new pieces from a corpus (SentencePiece BPE training)
  id_map             id_map.json (old id -> new id)
  report             the printed / JSON report
  api                the orchestration, atomic output and checks
"""

from colossal_shear.core.errors import VocabError
from colossal_shear.vocab.config import TokenizerConfig
from colossal_shear.vocab.id_map import ID_MAP_FILE, read_id_map, write_id_map
from colossal_shear.vocab.report import TokenizerReport
from colossal_shear.vocab.tokenizer import init_tokenizer, open_tokenizer

__all__ = [
    "ID_MAP_FILE",
    "TokenizerConfig",
    "TokenizerReport",
    "VocabError",
    "init_tokenizer",
    "open_tokenizer",
    "read_id_map",
    "write_id_map",
]

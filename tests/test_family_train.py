"""Training per model family: the loss our training path computes (the model `build_model` makes: chunked LM loss
in place of the HF loss, the attention kernel fed packed documents through a dense block-causal mask) equals the
model's own loss, each document run on its own through the stock Hugging Face model with its reference (eager)
attention; under every CPU plugin on 2 processes (zero2 for every family, ddp and 3d tp=2 where they add a case)
the trainer's logged losses are the plain model's on the same batches; `3d` refuses a family colossalai has no
shardformer policy for, before the process group starts."""

import functools
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import FAMILIES, ROOT, run_distributed
from transformers import AutoConfig, AutoModelForCausalLM

from colossal_shear.train.distributed.plugins import PluginError, check_parallel_config
from colossal_shear.train.model import build_model
from colossal_shear.train.optim import make_optimizer

sys.path.insert(0, str(ROOT / "tests" / "workers"))
from family_steps import LR, STEPS, packed_rows, train_config  # noqa: E402

# colossalai 0.5.0's shardformer has policies for these (llama.py, mistral.py, qwen2.py); the others are refused
SHARDFORMER_FAMILIES = ("llama", "llama3", "mistral", "qwen2")
WORKER = ROOT / "tests" / "workers" / "family_steps.py"
# Gemma 2's soft-capping (30 and 50) does not bite on a tiny random model's small logits: caps that do
# and a Mistral sliding window shorter than the packed documents (the dense mask must carry it)
BITING = {"gemma2": dict(attn_logit_softcapping=0.05, final_logit_softcapping=1.0), "mistral": dict(sliding_window=5)}


def true_loss(path, batch):
    """Mean over labelled tokens of the stock model's own loss, each document on its own, eager attention; and
    that model."""
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    total, count = 0.0, 0
    for row in range(batch["input_ids"].shape[0]):
        for doc in batch["document_ids"][row].unique():
            keep = batch["document_ids"][row] == doc
            ids, labels = batch["input_ids"][row][keep][None], batch["labels"][row][keep][None]
            n = int((labels[:, 1:] != -100).sum())
            total = total + model(input_ids=ids, labels=labels).loss * n
            count += n
    return total / count, model


@pytest.mark.parametrize("family", FAMILIES)
def test_training_loss_is_the_models_own(family, family_model):
    """Final-logit soft-capping (Gemma 2), attention soft-capping (routed to eager), q/k norms, biases, fused
    projections, (1+w) norms and the embedding scale all reach the training loss; the gradient is the true one."""
    path = family_model(family, **BITING.get(family, {}))
    batch = packed_rows(AutoConfig.from_pretrained(path).vocab_size)
    model = build_model(train_config(path, "zero2"), str(path))
    out = model(**batch)
    assert out.logits is None and out.last_hidden_state is not None, "the chunked loss did not replace the HF loss"
    reference, stock = true_loss(path, batch)
    torch.testing.assert_close(out.loss, reference, rtol=1e-5, atol=1e-5)
    out.loss.backward()
    reference.backward()
    for name, p in stock.named_parameters():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in SHARDFORMER_FAMILIES])
def test_3d_refuses_a_family_without_a_shardformer_policy(family, family_model):
    config = AutoConfig.from_pretrained(family_model(family))
    with pytest.raises(PluginError) as err:
        check_parallel_config(train_config("x", plugin="3d", tp=2).parallel, world_size=2, model_config=config)
    message = str(err.value)
    assert "\n" not in message and "no policy" in message and config.model_type in message
    assert "use --plugin zero2, zero2_cpu, ddp" in message


@pytest.mark.parametrize("family", SHARDFORMER_FAMILIES)
def test_3d_accepts_a_family_with_a_shardformer_policy(family, family_model):
    config = AutoConfig.from_pretrained(family_model(family))
    check_parallel_config(train_config("x", plugin="3d", tp=2).parallel, world_size=2, model_config=config)


# --- 2 processes per plugin: one launch runs every family of its case ---------------------------------------------

# 3d: tensor parallelism; Qwen2 tied with an odd vocabulary, which colossalai pads to a multiple of 64·tp (2,176
# rows): the padded rows of the tied head must stay out of the loss (compat.qwen2_padded_head)
ODD_VOCAB = {"qwen2": dict(vocab_size=2051)}
CASES = {
    "zero2": (["--plugin", "zero2"], FAMILIES, BITING),
    "ddp": (["--plugin", "ddp"], FAMILIES, BITING),
    "zero2_cpu": (["--plugin", "zero2_cpu"], FAMILIES, BITING),
    "3d_tp2": (["--plugin", "3d", "--tp", "2"], SHARDFORMER_FAMILIES, ODD_VOCAB),
}


@pytest.fixture(scope="module")
def launched(family_model, tmp_path_factory):
    """{case: ({family: model dir}, [rank records])}, each case launched once, on first use."""
    done = {}

    def get(case):
        if case not in done:
            flags, families, overrides = CASES[case]
            paths = {f: family_model(f, **overrides.get(f, {})) for f in families}
            out = tmp_path_factory.mktemp(case)
            models = ",".join(f"{f}={p}" for f, p in paths.items())
            run_distributed(WORKER, "--models", models, "--out", out, *flags)
            done[case] = paths, [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
        return done[case]

    return get


@functools.cache
def plain_steps(path, dp_ranks: tuple[int, ...]) -> list[float]:
    """Single process, no ColossalAI, the same model build, optimizer and clipping on the union of the ranks'
    batches: the losses every plugin must reproduce."""
    model = build_model(train_config(path, plugin="ddp"), str(path))
    batches = [packed_rows(model.config.vocab_size, seed=r) for r in dp_ranks]
    data = {k: torch.cat([b[k] for b in batches]) for k in batches[0]}
    optimizer = make_optimizer(model.parameters(), lr=LR)
    losses = []
    for _ in range(STEPS):
        loss = model(**data).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize(
    "case,family", [(c, f) for c, (_, families, _) in CASES.items() for f in families], ids=lambda v: str(v)
)
def test_plugin_trains_each_family_like_plain_pytorch(case, family, launched):
    """The mean loss over data-parallel ranks follows a plain single-process run step for step; the first step's
    loss is the stock model's own (each document alone, eager attention): under 3d tp=2 through shardformer's
    vocabulary-parallel loss, padded vocabulary included."""
    paths, ranks = launched(case)
    path, records = paths[family], [r[family] for r in ranks]
    dp_ranks = tuple(sorted({r["dp_rank"] for r in records}))
    mean = [sum(r["losses"][s] for r in records) / len(records) for s in range(STEPS)]
    assert mean == pytest.approx(plain_steps(path, dp_ranks), abs=2e-4), f"{case} {family}: {mean}"
    assert mean[-1] < mean[0]
    for r in records:
        assert r["path"] == ("shardformer" if case.startswith("3d") else "chunked")
    if case.startswith("3d"):  # (the chunked path's first loss is the true one: test_training_loss_is_the_models_own)
        batch = packed_rows(AutoConfig.from_pretrained(path).vocab_size, seed=0)
        assert records[0]["losses"][0] == pytest.approx(true_loss(path, batch)[0].item(), abs=1e-5)


def test_train_py_refuses_3d_for_gemma_before_the_process_group(family_model, dataset, tmp_path):
    """The CLI: one line, exit 2, from preflight (no process group, nothing written)."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "--pretrained", str(family_model("gemma")), "--dataset", str(dataset)]
        + ["--plugin", "3d", "--mixed_precision", "fp32", "--save_dir", str(tmp_path / "ckpt"), "--max_steps", "1"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and "cannot shard a GemmaForCausalLM" in errors[0], proc.stderr[-3000:]
    assert "zero2" in errors[0] and "Traceback" not in proc.stderr
    assert not (tmp_path / "ckpt").exists()


@pytest.fixture(scope="module")
def expanded_tokenizer(tokenizer_dir, tmp_path_factory):
    """The bundled tokenizer (every tiny family shares it) expanded with Chinese words by init_tokenizer."""
    from conftest import ZH_WORDS

    from colossal_shear.vocab import TokenizerConfig, init_tokenizer

    work = tmp_path_factory.mktemp("family-vocab")
    words = work / "zh_words.jsonl"
    words.write_text("".join(json.dumps({"piece": w}, ensure_ascii=False) + "\n" for w in ZH_WORDS), encoding="utf-8")
    init_tokenizer(
        TokenizerConfig(tokenizer_dir, work / "tok", expand_tokens_file=words, num_workers=1, progress=False)
    )
    return work / "tok"


@pytest.mark.parametrize("family", FAMILIES)
def test_vocab_resize_keeps_old_token_logits(family, family_model, expanded_tokenizer, tmp_path):
    """init_tokenizer + resize (`--init subtoken_mean`, the default) per family: old-token logits bit-identical,
    the new rows present, the family (model_type, tying) kept."""
    from colossal_shear.vocab.resize import ResizeConfig, resize_model

    src = family_model(family)
    resize_model(ResizeConfig(src, expanded_tokenizer, tmp_path / "out", progress=False))
    a = AutoModelForCausalLM.from_pretrained(src, torch_dtype=torch.float32).eval()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "out", torch_dtype=torch.float32).eval()
    rows = a.get_output_embeddings().weight.shape[0]
    assert b.config.model_type == a.config.model_type and b.config.tie_word_embeddings == a.config.tie_word_embeddings
    assert b.get_output_embeddings().weight.shape[0] > rows
    ids = torch.randint(3, rows, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits[..., :rows])

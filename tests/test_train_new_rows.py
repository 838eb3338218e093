"""`train.py --stage align --train_embeddings new` on 2 CPU processes: the old embedding / LM-head rows stay
bit-identical (even with weight decay on), the new rows move, nothing else moves; ddp and zero2, tied and untied."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import ROOT, ZH_WORDS, prepare_bundled_corpus, run_distributed
from transformers import AutoModelForCausalLM, AutoTokenizer

from colossal_shear.core.config import parse
from colossal_shear.core.errors import TrainingError
from colossal_shear.train.config import TrainConfig
from colossal_shear.train.preflight import preflight
from colossal_shear.vocab import TokenizerConfig, init_tokenizer
from colossal_shear.vocab.resize import ResizeConfig, resize_model

TRAIN = ROOT / "train.py"
WORDS = ZH_WORDS[:16]


@pytest.fixture(scope="module")
def expanded(tokenizer_dir, model_dir, tied_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("newrows")
    words = root / "words.jsonl"
    words.write_text("".join(json.dumps({"piece": w}, ensure_ascii=False) + "\n" for w in WORDS), encoding="utf-8")
    tok = root / "tok"
    init_tokenizer(
        TokenizerConfig(
            source_tokenizer_dir=tokenizer_dir,
            target_tokenizer_dir=tok,
            expand_tokens_file=words,
            num_workers=1,
            progress=False,
        )
    )
    out = {"tok": tok, "root": root}
    for name, src in (("untied", model_dir), ("tied", tied_model_dir)):
        resize_model(ResizeConfig(src, tok, root / name, progress=False))
        out[name] = (src, root / name)
    data = root / "data"
    prepare_bundled_corpus(tok, data, bins=1)
    out["data"] = data
    out["n_tok"] = len(AutoTokenizer.from_pretrained(tok))
    return out


def _state(d):
    return AutoModelForCausalLM.from_pretrained(d, torch_dtype=torch.float32).state_dict()


@pytest.mark.parametrize(
    "plugin,kind,precision", [("zero2", "tied", "fp32"), ("ddp", "untied", "fp32"), ("zero2", "untied", "bf16")]
)
def test_only_new_rows_train(expanded, plugin, kind, precision, tmp_path):
    """bf16 under zero2: the fp32 master copy of a bf16 weight is exact, so the old rows stay the bf16 values."""
    _, start = expanded[kind]
    export = tmp_path / "export"
    run_distributed(
        TRAIN,
        "--pretrained",
        start,
        "--dataset",
        expanded["data"],
        "--stage",
        "align",
        "--train_embeddings",
        "new",
        "--plugin",
        plugin,
        "--mixed_precision",
        precision,
        "--batch_size",
        2,
        "--max_steps",
        3,
        "--lr",
        1e-2,
        "--warmup_steps",
        0,
        "--weight_decay",
        0.1,
        "--save_interval",
        0,
        "--export_dir",
        export,
    )
    before, after = _state(start), _state(export)
    if precision == "bf16":
        before = {k: v.to(torch.bfloat16).float() for k, v in before.items()}
    assert before.keys() == after.keys()
    n_tok = expanded["n_tok"]
    weights = ["model.embed_tokens.weight"] + ([] if kind == "tied" else ["lm_head.weight"])
    for name in before:
        if name in weights or (kind == "tied" and name == "lm_head.weight"):
            assert torch.equal(before[name][:2048], after[name][:2048]), f"{name}: old rows moved"
            moved = int((before[name][2048:n_tok] != after[name][2048:n_tok]).any(1).sum())
            # every new head row gets a softmax gradient; an untied input row only where its token was read
            least = 1 if name == "model.embed_tokens.weight" and kind == "untied" else n_tok - 2048
            assert moved >= least, f"{name}: only {moved} new rows moved"
        else:
            assert torch.equal(before[name], after[name]), f"{name} moved"
    if precision == "bf16":
        return
    a = AutoModelForCausalLM.from_pretrained(start).eval()
    b = AutoModelForCausalLM.from_pretrained(export).eval()
    x = torch.randint(3, 2048, (2, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(a(x).logits[..., :2048], b(x).logits[..., :2048])


def test_train_embeddings_all_moves_old_rows_with_the_same_flags(expanded, tmp_path):
    """The control: the same run training all rows changes old rows, so the test above can fail."""
    _, start = expanded["untied"]
    export = tmp_path / "export"
    run_distributed(
        TRAIN,
        "--pretrained",
        start,
        "--dataset",
        expanded["data"],
        "--stage",
        "align",
        "--plugin",
        "ddp",
        "--mixed_precision",
        "fp32",
        "--batch_size",
        2,
        "--max_steps",
        2,
        "--lr",
        1e-2,
        "--warmup_steps",
        0,
        "--save_interval",
        0,
        "--export_dir",
        export,
    )
    assert not torch.equal(
        _state(start)["model.embed_tokens.weight"][:2048], _state(export)["model.embed_tokens.weight"][:2048]
    )


def test_preflight_errors(expanded, model_dir, monkeypatch):
    def check(match, model, *extra, world=1):
        monkeypatch.setenv("WORLD_SIZE", str(world))
        cfg = parse(
            TrainConfig, ["--pretrained", model, "--dataset", expanded["data"], "--train_embeddings", "new", *extra]
        )
        with pytest.raises(TrainingError, match=match):
            preflight(cfg)

    _, start = expanded["untied"]
    check("belongs to the align stage", start)
    check("the 3d plugin's shardformer", start, "--stage", "align", "--plugin", "3d", "--tp", 2, world=2)
    no_rows = expanded["root"] / "no-rows"
    no_rows.mkdir()
    for f in Path(start).iterdir():
        if f.name not in ("new_rows.json", "id_map.json"):
            (no_rows / f.name).symlink_to(f)
    check("neither new_rows.json nor id_map.json", no_rows, "--stage", "align")

"""Every supported model family (tiny random models of `bundled.FAMILY_CONFIGS`, norms and biases off their defaults)
exact at every pruning step: masked == folded with hidden channels, query heads, KV heads, neurons and layers pruned,
the fold saved and reloaded as the same model_type, `prune.py` (importance, depth, random), the prune stage's hooks;
and an unsupported family (GPT-NeoX) or feature refused in one line by the registry and by every CLI."""

from __future__ import annotations

import importlib.util
import itertools
import json

import pytest
import torch
from conftest import FAMILIES, ROOT
from transformers import AutoConfig, AutoModelForCausalLM, GPTNeoXConfig, GPTNeoXForCausalLM

from colossal_shear import cli
from colossal_shear.models.base import ModelFamilyError
from colossal_shear.models.registry import SUPPORTED, adapter_for
from colossal_shear.pruning.fold import fold, save_folded
from colossal_shear.pruning.masked_model import MaskedModel
from colossal_shear.pruning.masks import _top_layers, select
from colossal_shear.pruning.oneshot import random_masks
from colossal_shear.pruning.shape import PruneShape

SOURCE = PruneShape(hidden=64, heads=4, layers=4, intermediate=192, kv_heads=2)
# layers 0-2 kept: Gemma 3's sliding / global pattern (S G S G) stays S G S; any kept triple keeps the others'
KEEP_LAYERS = [0, 1, 2]


def _load(path):
    return AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def ids():
    return torch.randint(3, 2048, (2, 24), generator=torch.Generator().manual_seed(1))


def _masks(gen, keep_layers=KEEP_LAYERS):
    """One KV group of two kept per layer with one of its query heads (KV heads and query heads pruned), 48 of 64
    hidden channels, 128 of 192 neurons, a layer removed; kept non-hidden units with values in (0.2, 1]."""
    L, H, KV, F, d = SOURCE.layers, SOURCE.heads, SOURCE.kv_heads, SOURCE.intermediate, SOURCE.hidden

    def choose(n, k):
        m = torch.zeros(n)
        m[torch.randperm(n, generator=gen)[:k]] = 1
        return m

    def soft(shape):
        return torch.rand(shape, generator=gen) * 0.8 + 0.2

    layer = torch.zeros(L)
    layer[keep_layers] = 1
    return {
        "hidden": choose(d, 48),
        "layer": layer * soft(L),
        "group": torch.stack([choose(KV, 1) for _ in range(L)]) * soft((L, KV)),
        "head": torch.stack([torch.cat([choose(H // KV, 1) for _ in range(KV)]) for _ in range(L)]) * soft((L, H)),
        "intermediate": torch.stack([choose(F, 128) for _ in range(L)]) * soft((L, F)),
    }


def _masked_logits(model, z, ids):
    with MaskedModel(model, lambda: z), torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_masked_equals_folded_and_reloads(family, family_model, ids, tmp_path):
    src = family_model(family)
    model = _load(src)
    z = _masks(torch.Generator().manual_seed(7))
    masked = _masked_logits(model, z, ids)
    with torch.no_grad():
        assert (masked - model(ids).logits).abs().max() > 1e-2  # the masks do something
    target = PruneShape(48, 1, 3, 128, 1)
    small = fold(model, z, target)
    with torch.no_grad():
        torch.testing.assert_close(small(ids).logits, masked, atol=1e-5, rtol=0)
    out = save_folded(small, None, tmp_path / "folded", tokenizer_dir=src)
    config = AutoConfig.from_pretrained(out)
    assert config.model_type == model.config.model_type and PruneShape.from_config(config) == target
    reloaded = _load(out)
    assert type(reloaded) is type(model)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, masked, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["gemma", "gemma2"])
def test_gemma_soft_hidden_mask_untied(family, family_model, ids):
    """Soft hidden values fold into an untied Gemma's embedding columns next to the sqrt(hidden) scale (and, with
    sandwich norms, into the norms after attention and MLP)."""
    model = _load(family_model(family, tie_word_embeddings=False))
    z = _masks(torch.Generator().manual_seed(3))
    z["hidden"] = z["hidden"] * (torch.rand(64, generator=torch.Generator().manual_seed(4)) * 0.8 + 0.2)
    masked = _masked_logits(model, z, ids)
    with torch.no_grad():
        torch.testing.assert_close(fold(model, z)(ids).logits, masked, atol=1e-5, rtol=0)


def test_alternating_layer_types_keep_their_positions(family_model):
    """Gemma 3 (sliding layers use a local rotary embedding), Gemma 2 with a window shorter than its context: the
    kept layers are chosen so that each keeps its type at its new index (the best total score among those), and a
    fold that would move a layer to a position of the other type is refused."""
    gemma3 = _load(family_model("gemma3_text"))
    with pytest.raises(ModelFamilyError, match="keep the pattern"):
        fold(gemma3, _masks(torch.Generator().manual_seed(7), keep_layers=[1, 2, 3]))
    assert adapter_for(gemma3.config).layer_pattern(3) == (["sliding", "global"] * 2, ["sliding", "global", "sliding"])
    z = select(
        SOURCE,
        PruneShape(64, 4, 3, 192, 2),
        {"layer": torch.tensor([0.0, 5, 5, 5])},
        layer_pattern=(adapter_for(gemma3.config).layer_pattern(3)),
    )
    assert z["layer"].tolist() == [1, 1, 1, 0]  # not the top 3 (1, 2, 3): that would be G S G
    gemma2 = AutoConfig.from_pretrained(family_model("gemma2"))
    assert adapter_for(gemma2).layer_pattern(3) is None  # window 512 = context 512: every layer the same
    gemma2.sliding_window = 16
    assert adapter_for(gemma2).layer_pattern(3) is not None
    # Gemma 3's real pattern (5 sliding, 1 global) on 12 layers cut to 8: the optimum of all valid choices
    config = {"model_type": "gemma3_text", "num_hidden_layers": 12, "sliding_window_pattern": 6, "rope_theta": 1e6}
    config["rope_local_base_freq"] = 1e4
    types, wanted = adapter_for(config).layer_pattern(8)
    scores = torch.rand(12, generator=torch.Generator().manual_seed(0))
    keep = _top_layers(scores, 8, (types, wanted)).nonzero().flatten().tolist()
    valid = [c for c in itertools.combinations(range(12), 8) if [types[i] for i in c] == wanted]
    assert [types[i] for i in keep] == wanted
    assert float(scores[keep].sum()) == pytest.approx(max(float(scores[list(c)].sum()) for c in valid))


def test_registry_refuses_unsupported_families_and_features():
    with pytest.raises(ModelFamilyError) as err:
        adapter_for(GPTNeoXConfig(), "--pretrained m")
    message = str(err.value)
    assert "--pretrained m: model type 'gpt_neox' is not supported" in message and "\n" not in message
    assert all(t in message for t in SUPPORTED)
    with pytest.raises(ModelFamilyError, match="gemma3_text"):
        adapter_for({"model_type": "gemma3"})
    with pytest.raises(ModelFamilyError, match="mixture-of-experts"):
        adapter_for({"model_type": "mistral", "num_local_experts": 8})
    assert {type(adapter_for({"model_type": t})).family for t in SUPPORTED} == set(SUPPORTED)


# ------------------------------------------------------------------------------------------------ prune.py
def _script_main(path):
    spec = importlib.util.spec_from_file_location(path.stem + "_cli", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


def _oneshot_args(method, src, out, target):
    args = ["--method", method, "--pretrained", str(src), "--output_dir", str(out), "--target_shape", target]
    return args + ["--num_calibration_samples", "8", "--calibration_length", "32"]


@pytest.mark.parametrize("family", FAMILIES)
def test_prune_py_every_method(family, family_model, ids, tmp_path, capsys):
    """importance (width and depth), depth and random export the target as the same model_type; random's export
    gives the masked model's logits (Gemma 3: layers chosen to keep the sliding / global pattern)."""
    main, src = _script_main(ROOT / "prune.py"), family_model(family)
    model = _load(src)
    width = "48,2,3,128,1"
    assert main(_oneshot_args("importance", src, tmp_path / "imp", width)) == 0
    assert main(_oneshot_args("random", src, tmp_path / "rnd", width)) == 0
    assert main(_oneshot_args("depth", src, tmp_path / "depth", "64,4,3,192,2")) == 0
    assert json.loads((tmp_path / "depth" / "config.json").read_text())["num_hidden_layers"] == 3
    target = PruneShape.parse(width, model.config)
    for out in ("imp", "rnd"):
        config = AutoConfig.from_pretrained(tmp_path / out)
        assert config.model_type == model.config.model_type and PruneShape.from_config(config) == target
    masked = _masked_logits(model, random_masks(model.config, target, 0), ids)
    with torch.no_grad():
        torch.testing.assert_close(_load(tmp_path / "rnd")(ids).logits, masked, atol=1e-5, rtol=0)
    if family == "gemma3_text":  # layers that would change type at their new position: one line, exit 2
        capsys.readouterr()
        args = [
            "--method",
            "depth",
            "--pretrained",
            str(src),
            "--keep_layers",
            "1,2,3",
            "--output_dir",
            str(tmp_path / "n"),
        ]
        assert main(args) == 2
        err = capsys.readouterr().err
        assert "attention types ['global', 'sliding', 'global'] differ" in err and err.count("\n") == 1, err


# ------------------------------------------------------------------------------------------------ up-front refusal
@pytest.fixture(scope="module")
def neox_dir(tokenizer_dir, tmp_path_factory):
    """A tiny real GPT-NeoX model (a family the fold cannot handle) with the bundled tokenizer."""
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("neox")
    config = GPTNeoXConfig(
        vocab_size=2048, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    )
    GPTNeoXForCausalLM(config).save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    return out


def test_every_cli_refuses_an_unsupported_family_up_front(neox_dir, dataset, tmp_path, capsys):
    from colossal_shear.train.trainer import train

    runs = {
        "prune.py": lambda: _script_main(ROOT / "prune.py")(
            _oneshot_args("importance", neox_dir, tmp_path / "p", "16,1,1,32")
        ),
        "init_model.py": lambda: _script_main(ROOT / "tokenizer" / "init_model.py")(
            [
                "--source_model_and_tokenizer_path",
                str(neox_dir),
                "--target_tokenizer_path",
                str(neox_dir),
                "--target_model_path",
                str(tmp_path / "r"),
            ]
        ),
        "train.py": lambda: cli.run(
            "train.py",
            train,
            lambda r: None,
            ["--pretrained", str(neox_dir), "--dataset", str(dataset), "--max_steps", "1"],
        ),
    }
    for script, run in runs.items():
        assert run() == 2, script
        err = capsys.readouterr().err
        assert err.startswith(f"{script}: error:") and err.count("\n") == 1, (script, err)
        assert "model type 'gpt_neox' is not supported; supported: llama" in err, (script, err)
    assert not any((tmp_path / d).exists() for d in ("p", "r"))


# ------------------------------------------------------------------------------------------------ the prune stage
@pytest.mark.parametrize("family", FAMILIES)
def test_prune_stage_hooks_train_and_fold_exactly(family, family_model, ids):
    """The prune stage's own hooks on each family: a training forward / backward reaches every gate's log_alpha, and
    its export transform folds the binary masks into a model with the masked model's logits."""
    from colossal_shear.train.config import PruneConfig
    from colossal_shear.train.stages.prune import PruneStage

    model = _load(family_model(family))
    target = "48,2,3,128,1"
    stage = PruneStage(
        PruneConfig(target_shape=target),
        model,
        model.config,
        total_steps=100,
        warmup_steps=1,
        seed=0,
        calibration_dataset=None,
        device=torch.device("cpu"),
        dp_rank=0,
    )
    with torch.no_grad():  # gates in the middle of their range: sampled values below 1, binarisation chooses
        for gate in stage.masks.gates.values():
            gate.log_alpha.copy_(torch.randn(gate.log_alpha.shape, generator=torch.Generator().manual_seed(2)))
    stage.train(True)
    stage.before_forward(0, 0)
    loss = model(ids, labels=ids).loss
    loss.backward()
    for kind, gate in stage.masks.gates.items():
        assert gate.log_alpha.grad is not None and gate.log_alpha.grad.abs().sum() > 0, kind
    stage.train(False)
    z = stage.masks.binarize()
    small = stage.export_transform()(model)  # detaches the stage's hooks
    assert PruneShape.from_config(small.config) == PruneShape.parse(target, model.config)
    with torch.no_grad():
        torch.testing.assert_close(small(ids).logits, _masked_logits(model, z, ids), atol=1e-5, rtol=0)


def test_prune_stage_on_two_processes_exports_qwen3(family_model, dataset, tmp_path):
    """A real 2-process prune stage on Qwen3 (q/k norms: its export used to fail after training) exports the target
    as a Qwen3 model."""
    from conftest import run_distributed

    src = family_model("qwen3")
    run_distributed(
        ROOT / "train.py",
        *("--stage", "prune", "--pretrained", src, "--dataset", dataset, "--plugin", "ddp"),
        *("--mixed_precision", "fp32", "--batch_size", 2, "--max_steps", 3, "--lr", 1e-3, "--warmup_steps", 1),
        *("--target_shape", "48,2,3,128,1", "--target_ramp_steps", 2, "--save_interval", 100),
        *("--save_dir", tmp_path / "ckpt", "--export_dir", tmp_path / "export"),
    )
    config = AutoConfig.from_pretrained(tmp_path / "export")
    assert config.model_type == "qwen3" and PruneShape.from_config(config) == PruneShape(48, 2, 3, 128, 1)
    with torch.no_grad():
        assert torch.isfinite(_load(tmp_path / "export")(torch.tensor([[1, 5, 9, 200]])).logits).all()

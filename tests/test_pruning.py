"""Structured pruning: shapes, hard-concrete gates, masks on the standard HF Llama, folding, one-shot methods, the
Lagrangian, the distillation loss and the prune.py CLI. All on the bundled tiny GQA Llama (4 heads in 2 KV groups)."""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from colossal_shear.pruning.fold import fold, save_folded
from colossal_shear.pruning.hard_concrete import HardConcrete
from colossal_shear.pruning.lagrangian import Lagrangian
from colossal_shear.pruning.masked_model import MaskedModel
from colossal_shear.pruning.masks import KINDS, PruningMasks
from colossal_shear.pruning.oneshot import calibration_batches, depth_masks, importance_masks, random_masks
from colossal_shear.pruning.shape import PruneShape
from colossal_shear.train.losses import kd_loss

ROOT = Path(__file__).resolve().parent.parent
SOURCE = PruneShape(hidden=64, heads=4, layers=4, intermediate=192, kv_heads=2)


def _load(path, dtype=torch.float32):
    return AutoModelForCausalLM.from_pretrained(path, torch_dtype=dtype).eval()


@pytest.fixture(scope="module")
def model(model_dir):
    return _load(model_dir)


@pytest.fixture(scope="module")
def tied_model(tied_model_dir):
    return _load(tied_model_dir)


@pytest.fixture(scope="module")
def ids():
    g = torch.Generator().manual_seed(1)
    return torch.randint(3, 2048, (2, 24), generator=g)


def _masked_logits(model, z, ids):
    with MaskedModel(model, lambda: z), torch.no_grad():
        return model(ids).logits


def _random_z(gen, n_groups, per_group, soft, hidden_keep=48, layers_keep=3, neurons_keep=128, soft_hidden=False):
    """Random masks over every kind: hidden channels, a removed layer, whole KV groups, query heads inside the kept
    groups (same count per group, different choices per layer), MLP neurons. `soft`: kept values in (0.2, 1]."""
    L, H, KV, F, d = SOURCE.layers, SOURCE.heads, SOURCE.kv_heads, SOURCE.intermediate, SOURCE.hidden
    ratio = H // KV

    def kept_values(shape):
        return torch.rand(shape, generator=gen) * 0.8 + 0.2 if soft else torch.ones(shape)

    def choose(n, k):
        m = torch.zeros(n)
        m[torch.randperm(n, generator=gen)[:k]] = 1
        return m

    hidden = choose(d, hidden_keep) * (torch.rand(d, generator=gen) * 0.8 + 0.2 if soft_hidden else 1)
    layer = choose(L, layers_keep) * kept_values(L)
    group = torch.stack([choose(KV, n_groups) for _ in range(L)]) * kept_values((L, KV))
    head = torch.stack([torch.cat([choose(ratio, per_group) for _ in range(KV)]) for _ in range(L)])
    head = head * kept_values((L, H))
    inter = torch.stack([choose(F, neurons_keep) for _ in range(L)]) * kept_values((L, F))
    return {"hidden": hidden, "layer": layer, "group": group, "head": head, "intermediate": inter}


# ------------------------------------------------------------------------------------------------ shapes
def test_shape_from_config_parse_and_kv_default(model, tmp_path):
    assert PruneShape.from_config(model.config) == SOURCE
    assert PruneShape.parse("48,2,3,128,1", model.config) == PruneShape(48, 2, 3, 128, 1)
    assert PruneShape.parse(" 48, 4, 3, 128 ", model.config).kv_heads == 2  # GQA: source KV heads divide 4
    assert PruneShape.parse("48,2,3,128", model.config).kv_heads == 2  # 2 % 2 == 0: one query head per group
    mha = LlamaConfig(
        hidden_size=64, num_attention_heads=8, num_key_value_heads=8, num_hidden_layers=2, intermediate_size=96
    )
    assert PruneShape.parse("64,6,2,96", mha).kv_heads == 6  # multi-head stays multi-head
    gqa = LlamaConfig(
        hidden_size=64, num_attention_heads=8, num_key_value_heads=4, num_hidden_layers=2, intermediate_size=96
    )
    assert PruneShape.parse("64,6,2,96", gqa).kv_heads == 3  # 4 does not divide 6: keep the group size 2
    with pytest.raises(ValueError, match="kv_heads"):
        PruneShape.parse(
            "64,3,2,96",
            LlamaConfig(
                hidden_size=64, num_attention_heads=8, num_key_value_heads=2, num_hidden_layers=2, intermediate_size=96
            ),
        )
    with pytest.raises(ValueError, match="4 or 5 integers"):
        PruneShape.parse("48,2,x,128", model.config)
    # a config.json or a model directory
    cfg = {
        "hidden_size": 32,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "num_hidden_layers": 2,
        "intermediate_size": 64,
    }
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "config.json").write_text(json.dumps(cfg))
    assert PruneShape.parse(str(tmp_path / "t"), model.config) == PruneShape(32, 2, 2, 64, 1)
    assert PruneShape.parse(str(tmp_path / "t" / "config.json"), model.config) == PruneShape(32, 2, 2, 64, 1)
    with pytest.raises(FileNotFoundError):
        PruneShape.parse(str(tmp_path / "missing"), model.config)


@pytest.mark.parametrize(
    "shape, message",
    [
        (PruneShape(80, 4, 4, 192, 2), "hidden 80 is larger"),
        (PruneShape(64, 4, 5, 192, 2), "layers 5 is larger"),
        (PruneShape(64, 3, 4, 192, 2), "not divisible"),
        (PruneShape(64, 4, 4, 192, 1), "more than the source's 2"),
        (PruneShape(64, 0, 4, 192, 1), "must be positive"),
    ],
)
def test_shape_validate_rejects(shape, message):
    with pytest.raises(ValueError, match=message):
        shape.validate_against(SOURCE)
    PruneShape(40, 2, 1, 8, 2).validate_against(SOURCE)  # hidden need not be a multiple of heads


def test_num_params_matches_models(model, tied_model):
    assert SOURCE.num_params(2048, 16, tied=False) == model.num_parameters()
    assert SOURCE.num_params(2048, 16, tied=True) == tied_model.num_parameters()


# ------------------------------------------------------------------------------------------------ hard concrete
def test_hard_concrete_statistics_match_keep_prob():
    values = torch.tensor([-3.0, -1.0, 0.0, 1.0, 3.0])
    n = 40000
    gate = HardConcrete((n, 5), init_std=0.0)
    with torch.no_grad():
        gate.log_alpha.copy_(values.expand(n, 5))
    z = gate.sample(torch.Generator().manual_seed(0))
    assert z.min() >= 0 and z.max() <= 1
    assert (z == 0).any() and (z == 1).any()  # the stretch puts mass exactly at 0 and 1
    empirical = (z > 0).float().mean(0)
    expected = gate.keep_prob()[0]
    assert torch.allclose(empirical, expected, atol=0.01), (empirical, expected)
    # the formula itself, and its direction
    assert torch.allclose(expected, 1 - torch.sigmoid(2 / 3 * math.log(0.1 / 1.1) - values))
    assert torch.all(expected[1:] > expected[:-1])
    det = gate.deterministic()[0]
    assert torch.allclose(det, (torch.sigmoid(values) * 1.2 - 0.1).clamp(0, 1))
    assert det.min() >= 0 and det.max() <= 1 and det[0] == 0 and det[-1] == 1
    big = HardConcrete(3, init_log_alpha=5.0)  # the default init keeps everything
    assert torch.all(big.keep_prob() > 0.99) and torch.all(big.deterministic() == 1)


class _Wrapper(torch.nn.Module):  # stands in for DDP / a Booster wrapper: the HF model is `.module`
    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "grad_ckpt"])
def test_gradients_reach_log_alpha_through_masked_forward(model, ids, checkpointing):
    target = PruneShape(48, 1, 3, 128, 1)  # every kind: hidden, layers, whole groups, heads in groups, neurons
    masks = PruningMasks(model.config, target, init_log_alpha=0.5)
    assert set(masks.pruned) == set(KINDS)
    gen = torch.Generator().manual_seed(0)
    model.train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    wrapped = _Wrapper(model)
    try:
        with MaskedModel(wrapped, lambda: masks.sample(gen)):
            out = wrapped(ids, labels=ids)
            out.loss.backward()  # through the masked forward only
    finally:
        model.gradient_checkpointing_disable()
        model.eval()
        model.zero_grad(set_to_none=True)
    for kind in KINDS:
        grad = masks.gates[kind].log_alpha.grad
        assert grad is not None and torch.isfinite(grad).all(), kind
        assert grad.abs().sum() > 0, kind
    masks.zero_grad()
    masks.expected_params().backward()  # the size constraint pushes every gate down
    assert all(torch.all(masks.gates[k].log_alpha.grad > 0) for k in KINDS)


# ------------------------------------------------------------------------------------------------ masked forward
def test_all_ones_masks_give_exactly_the_original_logits(model, tied_model, ids):
    for m in (model, tied_model):
        with torch.no_grad():
            ref = m(ids).logits
        full = PruneShape.from_config(m.config)
        masks = PruningMasks(m.config, full)
        assert masks.pruned == [] and list(masks.parameters()) == []
        ones = masks.deterministic()
        assert set(ones) == set(KINDS) and all(torch.all(v == 1) for v in ones.values())
        assert torch.equal(_masked_logits(m, ones, ids), ref)
        with torch.no_grad():
            assert torch.equal(m(ids).logits, ref)  # detached: no hook left behind


def test_masks_change_the_output_and_detach_restores(model, ids):
    with torch.no_grad():
        ref = model(ids).logits
    z = _random_z(torch.Generator().manual_seed(3), 1, 1, soft=False)
    masked = MaskedModel(model, lambda: z).attach()
    try:
        with torch.no_grad():
            out = model(ids).logits
        assert masked.z is z
    finally:
        masked.detach()
    assert (out - ref).abs().max() > 1e-2
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize(
    "n_groups, per_group", [(1, 1), (2, 1), (1, 2)], ids=["1group1head", "2groups1head", "1group2heads"]
)
@pytest.mark.parametrize("soft", [False, True], ids=["binary", "soft"])
def test_masked_and_folded_logits_agree(model, tied_model, ids, tied, n_groups, per_group, soft):
    m = tied_model if tied else model
    z = _random_z(torch.Generator().manual_seed(10 * n_groups + per_group + 100 * soft), n_groups, per_group, soft)
    masked = _masked_logits(m, z, ids)
    target = PruneShape(48, n_groups * per_group, 3, 128, n_groups)
    small = fold(m, z, target)
    assert PruneShape.from_config(small.config) == target
    assert small.config.head_dim == 16 and small.config.tie_word_embeddings == tied
    assert small.num_parameters() == target.num_params(2048, 16, tied)
    with torch.no_grad():
        folded = small(ids).logits
        original = m(ids).logits
    assert (masked - original).abs().max() > 1e-2  # the masks do something
    torch.testing.assert_close(folded, masked, atol=1e-5, rtol=0)
    if tied:
        assert small.lm_head.weight.data_ptr() == small.model.embed_tokens.weight.data_ptr()


def test_soft_hidden_mask_folds_into_untied_and_is_refused_for_tied(model, tied_model, ids):
    z = _random_z(torch.Generator().manual_seed(5), 2, 1, soft=True, soft_hidden=True)
    masked = _masked_logits(model, z, ids)
    with torch.no_grad():
        folded = fold(model, z)(ids).logits
    torch.testing.assert_close(folded, masked, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="tied"):
        fold(tied_model, z)


def test_fold_refuses_non_uniform_layouts(model):
    z = _random_z(torch.Generator().manual_seed(0), 2, 1, soft=False)
    bad = {k: v.clone() for k, v in z.items()}
    kept = int(torch.nonzero(bad["layer"]).flatten()[0])
    bad["intermediate"][kept, torch.nonzero(bad["intermediate"][kept]).flatten()[0]] = 0
    with pytest.raises(ValueError, match="different shapes"):
        fold(model, bad)
    bad = {k: v.clone() for k, v in z.items()}
    bad["head"][kept] = torch.tensor([1.0, 1.0, 1.0, 0.0])
    bad["group"][kept] = 1.0
    with pytest.raises(ValueError, match="same number"):
        fold(model, bad)
    with pytest.raises(ValueError, match="not the target"):
        fold(model, z, PruneShape(48, 2, 3, 128, 1))


def test_masked_forward_in_bf16(model_dir, ids):
    m = _load(model_dir, torch.bfloat16)
    z = _random_z(torch.Generator().manual_seed(7), 1, 1, soft=True)
    out = _masked_logits(m, z, ids)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    with torch.no_grad():
        folded = fold(m, z)(ids).logits
    assert folded.dtype == torch.bfloat16
    assert (folded.float() - out.float()).abs().max() < 0.05


def test_save_folded_round_trip(model, tied_model, ids, tmp_path, tokenizer_dir):
    for name, m in (("untied", model), ("tied", tied_model)):
        z = _random_z(torch.Generator().manual_seed(11), 1, 2, soft=True)
        out = save_folded(m, z, tmp_path / name, tokenizer_dir=tokenizer_dir)
        cfg = json.loads((out / "config.json").read_text())
        assert (
            cfg["hidden_size"],
            cfg["num_attention_heads"],
            cfg["num_hidden_layers"],
            cfg["intermediate_size"],
            cfg["num_key_value_heads"],
            cfg["head_dim"],
        ) == (48, 2, 3, 128, 1, 16)
        assert cfg["tie_word_embeddings"] == (name == "tied")
        assert (out / "model.safetensors").is_file() and (out / "tokenizer.model").is_file()
        loaded = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=False).eval()
        with torch.no_grad():
            torch.testing.assert_close(loaded(ids).logits, _masked_logits(m, z, ids), atol=1e-5, rtol=0)
        assert len(AutoTokenizer.from_pretrained(out)) == 2048
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary directory left
    with pytest.raises(FileExistsError):
        save_folded(model, z, tmp_path / "untied")
    save_folded(model, z, tmp_path / "untied", overwrite=True)


# ------------------------------------------------------------------------------------------------ masks
@pytest.mark.parametrize(
    "target", [PruneShape(48, 2, 3, 128, 1), PruneShape(40, 2, 2, 100, 2), PruneShape(64, 2, 4, 192, 1)], ids=str
)
def test_binarize_exact_counts_and_valid_gqa(model, target, ids):
    masks = PruningMasks(model.config, target)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for gate in masks.gates.values():
            gate.log_alpha.copy_(torch.randn(gate.log_alpha.shape, generator=gen) * 3)
    z = masks.binarize()
    assert set(z) == set(KINDS)
    assert int((z["hidden"] != 0).sum()) == target.hidden
    assert set(z["hidden"].unique().tolist()) <= {0.0, 1.0}
    kept_layers = torch.nonzero(z["layer"]).flatten()
    assert len(kept_layers) == target.layers
    if "layer" in masks.gates:  # the top log_alpha layers are kept
        top = masks.gates["layer"].log_alpha.topk(target.layers).indices
        assert set(top.tolist()) == set(kept_layers.tolist())
    ratio = target.heads // target.kv_heads
    for i in range(SOURCE.layers):
        heads = (z["head"][i] * z["group"][i].repeat_interleave(2)).view(2, 2) != 0
        kept_groups = heads.any(-1)
        assert int(kept_groups.sum()) == target.kv_heads
        assert all(int(heads[g].sum()) == ratio for g in range(2) if kept_groups[g])
        assert int((z["intermediate"][i] != 0).sum()) == target.intermediate
    for kind in ("layer", "group", "head", "intermediate"):  # kept units carry their deterministic z
        kept = z[kind] != 0
        det = masks.deterministic()[kind].clamp(min=masks.min_kept_value)
        assert torch.equal(z[kind][kept], det[kept])
    small = fold(model, z, target)
    assert PruneShape.from_config(small.config) == target
    torch.testing.assert_close(small(ids).logits, _masked_logits(model, z, ids), atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory, tokenizer_dir):
    """8 query heads in 2 KV groups (4 per group): pruning query heads inside groups has real choices."""
    from colossal_shear.bundled import TinyLlamaShape, build_tiny_llama

    shape = TinyLlamaShape(
        hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2
    )
    return _load(build_tiny_llama(tmp_path_factory.mktemp("wide") / "m", tokenizer_dir, shape=shape, seed=1))


@pytest.mark.parametrize(
    "target", [PruneShape(48, 6, 2, 48, 2), PruneShape(64, 2, 1, 64, 1), PruneShape(56, 4, 2, 32, 2)], ids=str
)
def test_binarize_within_groups_on_a_wider_model(wide_model, target, ids):
    masks = PruningMasks(wide_model.config, target)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for gate in masks.gates.values():
            gate.log_alpha.copy_(torch.randn(gate.log_alpha.shape, generator=gen) * 3)
    z = masks.binarize()
    ratio = target.heads // target.kv_heads
    for i in range(2):
        heads = (z["head"][i] * z["group"][i].repeat_interleave(4)).view(2, 4)
        kept_groups = (heads != 0).any(-1)
        assert int(kept_groups.sum()) == target.kv_heads
        for g in range(2):
            if kept_groups[g] and "head" in masks.gates:  # the top-scored heads of the group
                scores = masks.gates["head"].log_alpha[i].view(2, 4)[g]
                assert set(torch.nonzero(heads[g]).flatten().tolist()) == set(scores.topk(ratio).indices.tolist())
    small = fold(wide_model, z, target)
    assert PruneShape.from_config(small.config) == target and small.config.head_dim == 8
    with torch.no_grad():
        torch.testing.assert_close(small(ids).logits, _masked_logits(wide_model, z, ids), atol=1e-5, rtol=0)


def test_expected_shape_and_params(model):
    target = PruneShape(48, 2, 3, 128, 1)
    masks = PruningMasks(model.config, target)
    assert masks.target_shape() == {"hidden": 48.0, "layers": 3.0, "heads": 2.0, "kv_heads": 1.0, "intermediate": 128.0}
    with torch.no_grad():
        for gate in masks.gates.values():
            gate.log_alpha.fill_(30.0)
    full = masks.expected_shape()
    assert set(full) == set(masks.target_shape())
    for k, v in {"hidden": 64, "layers": 4, "heads": 4, "kv_heads": 2, "intermediate": 192}.items():
        assert abs(float(full[k].detach()) - v) < 1e-3, k
    assert abs(float(masks.expected_params().detach()) / model.num_parameters() - 1) < 1e-4
    previous = {k: float(v.detach()) for k, v in full.items()}, float(masks.expected_params().detach())
    for value in (2.0, 0.0, -2.0):
        with torch.no_grad():
            for gate in masks.gates.values():
                gate.log_alpha.fill_(value)
        now = {k: float(v.detach()) for k, v in masks.expected_shape().items()}
        assert all(now[k] < previous[0][k] for k in now), (value, now)
        assert float(masks.expected_params().detach()) < previous[1]
        previous = now, float(masks.expected_params().detach())
    # heads include the group effect: query heads = sum over heads of P(head) * P(group)
    p = masks.keep_probs()
    manual = (p["head"] * p["group"].repeat_interleave(2, dim=1)).sum(1).mean()
    assert torch.allclose(masks.expected_shape()["heads"], manual)
    # only the kinds the target shrinks are learnable; the state dict round-trips
    masks2 = PruningMasks(model.config, PruneShape(64, 2, 4, 192, 2))
    assert masks2.pruned == ["head"]
    masks2.load_state_dict(masks2.state_dict())


# ------------------------------------------------------------------------------------------------ lagrangian
def test_lagrangian_ramp_and_penalty():
    target = PruneShape(48, 4, 3, 96, 2)  # heads and kv_heads unchanged: no constraint for them
    lag = Lagrangian(SOURCE, target, warmup_steps=10)
    assert lag.constraints == ["hidden", "layers", "intermediate"]
    assert lag.target_at(0) == {"hidden": 64.0, "layers": 4.0, "intermediate": 192.0}
    assert lag.target_at(5) == {"hidden": 56.0, "layers": 3.5, "intermediate": 144.0}
    assert lag.target_at(10) == lag.target_at(1000) == {"hidden": 48.0, "layers": 3.0, "intermediate": 96.0}
    assert Lagrangian(SOURCE, target, warmup_steps=0).target_at(0)["hidden"] == 48.0
    expected = {
        "hidden": torch.tensor(60.0, requires_grad=True),
        "layers": torch.tensor(4.0),
        "heads": torch.tensor(4.0),
        "kv_heads": torch.tensor(2.0),
        "intermediate": torch.tensor(150.0),
    }
    assert float(lag.penalty(expected, 10).detach()) == 0.0  # multipliers start at 0
    with torch.no_grad():
        lag.lambda_1.copy_(torch.tensor([1.0, 2.0, 0.5]))
        lag.lambda_2.copy_(torch.tensor([3.0, 0.0, 1.0]))
    diffs = [60 / 64 - 48 / 64, 4 / 4 - 3 / 4, 150 / 192 - 96 / 192]
    manual = sum(l1 * d + l2 * d * d for l1, l2, d in zip([1.0, 2.0, 0.5], [3.0, 0.0, 1.0], diffs))
    penalty = lag.penalty(expected, 10)
    assert abs(float(penalty.detach()) - manual) < 1e-6
    penalty.backward()
    # too big a model with positive multipliers: descent on the masks shrinks it; ascent on lambda1 grows it
    assert expected["hidden"].grad > 0
    assert torch.allclose(lag.lambda_1.grad, torch.tensor(diffs))
    assert torch.allclose(lag.lambda_2.grad, torch.tensor(diffs) ** 2)
    # at the ramp's start the target is the source: a model of the source's size costs nothing
    src = {
        k: torch.tensor(float(getattr(SOURCE, k))) for k in ("hidden", "layers", "heads", "kv_heads", "intermediate")
    }
    assert float(lag.penalty(src, 0).detach()) == 0.0


def test_lagrangian_quadratic_term_is_per_layer_then_averaged(model):
    """The reference takes lambda1 d + lambda2 d^2 per layer, then the mean: two layers at +-0.25 off target cost
    lambda2 * 0.0625 although their mean is on target (the mean-over-layers form gave 0)."""
    target = PruneShape(64, 4, 4, 96, 2)
    lag = Lagrangian(SOURCE, target, warmup_steps=0)
    assert lag.constraints == ["intermediate"]
    with torch.no_grad():
        lag.lambda_1.fill_(1.0)
        lag.lambda_2.fill_(2.0)
    per_layer = torch.tensor([96 + 48.0, 96 - 48.0, 96.0, 96.0])  # d = +0.25, -0.25, 0, 0
    got = float(lag.penalty({"intermediate": per_layer}, 0).detach())
    assert abs(got - 2.0 * (0.0625 + 0.0625) / 4) < 1e-7
    assert float(lag.penalty({"intermediate": per_layer.mean()}, 0).detach()) == 0.0
    masks = PruningMasks(model.config, PruneShape(48, 2, 3, 128, 1))
    per = masks.expected_per_layer()
    assert per["intermediate"].shape == per["heads"].shape == per["kv_heads"].shape == (4,)
    for k, v in masks.expected_shape().items():
        assert torch.allclose(per[k].mean() if per[k].dim() else per[k], v), k


def test_log_alpha_is_clamped_to_the_reference_range(model):
    """constrain() keeps log_alpha in [ln 0.01, ln 100]: beyond it the gates' sigmoid is flat and they stop moving."""
    masks = PruningMasks(model.config, PruneShape(48, 2, 3, 128, 1), init_log_alpha=5.0)
    with torch.no_grad():
        masks.gates["hidden"].log_alpha[:3] = torch.tensor([-25.0, 25.0, 1.0])
    masks.constrain()
    for kind, gate in masks.gates.items():
        la = gate.log_alpha.detach()
        assert float(la.min()) >= math.log(0.01) - 1e-6 and float(la.max()) <= math.log(100) + 1e-6, kind
    assert masks.gates["hidden"].log_alpha[:3].tolist() == pytest.approx([math.log(0.01), math.log(100), 1.0])
    assert masks.gates["layer"].log_alpha.tolist() == pytest.approx([math.log(100)] * 4)  # init 5 -> 4.6


# ------------------------------------------------------------------------------------------------ distillation
def test_kd_loss():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 6, 11, generator=g, requires_grad=True)
    t = torch.randn(2, 6, 11, generator=g)
    labels = torch.tensor([[-100, -100, 3, 4, 5, 6], [-100, 1, 2, -100, -100, 7]])
    assert float(kd_loss(t, t, labels, 2.0)) == pytest.approx(0.0, abs=1e-6)
    loss = kd_loss(s, t, labels, 2.0)
    value = float(loss.detach())
    assert value > 0
    manual, n = 0.0, 0
    for b in range(2):
        for i in range(5):
            if labels[b, i + 1] == -100:
                continue
            p = torch.softmax(t[b, i] / 2, -1)
            q = torch.softmax(s[b, i].detach() / 2, -1)
            manual += 4 * float((p * (p.log() - q.log())).sum())
            n += 1
    assert value == pytest.approx(manual / n, rel=1e-5)
    loss.backward()
    assert s.grad[0, 0].abs().sum() == 0 and s.grad[0, 5].abs().sum() == 0  # no label at 1; the last is unshifted
    assert s.grad[0, 1].abs().sum() > 0
    s2, t2 = s.detach().clone(), t.clone()
    s2[0, 0] += 5
    t2[1, 3] -= 5  # positions whose next label is -100 do not count
    assert float(kd_loss(s2, t2, labels, 2.0)) == pytest.approx(value, rel=1e-6)
    none = kd_loss(s, t, torch.full_like(labels, -100), 1.0)
    assert float(none.detach()) == 0.0 and none.requires_grad


# ------------------------------------------------------------------------------------------------ one-shot
@pytest.fixture(scope="module")
def calibration(tokenizer_dir):
    return calibration_batches(
        AutoTokenizer.from_pretrained(tokenizer_dir), None, num_samples=8, length=32, batch_size=4
    )


def test_importance_masks_follow_activations(model, calibration, ids):
    target = PruneShape(48, 2, 3, 128, 1)
    z = importance_masks(model, calibration, target)
    small = fold(model, z, target)
    assert PruneShape.from_config(small.config) == target
    assert torch.isfinite(small(ids).logits).all()
    # neurons whose gate projection is zero never fire: importance must drop exactly those
    dead = _load(model.config._name_or_path)
    with torch.no_grad():
        for layer in dead.model.layers:
            layer.mlp.gate_proj.weight[:64] = 0
            layer.self_attn.v_proj.weight[:16] = 0  # KV group 0 outputs nothing: its heads are unimportant
    z = importance_masks(dead, calibration, target)
    assert torch.all(z["intermediate"][:, :64] == 0) and torch.all(z["intermediate"][:, 64:] == 1)
    assert torch.all(z["group"][:, 0] == 0) and torch.all(z["group"][:, 1] == 1)


def test_depth_masks(model, calibration, ids):
    target = PruneShape(64, 4, 2, 192, 2)
    z = depth_masks(model, None, target, layers=[0, 3])
    small = fold(model, z, target)
    assert small.config.num_hidden_layers == 2
    for new, old in ((0, 0), (1, 3)):  # the kept layers are the source's, untouched
        a, b = small.model.layers[new].state_dict(), model.model.layers[old].state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(small.lm_head.weight, model.lm_head.weight)
    # block influence: a layer that is the identity has BI 0 and goes first
    ident = _load(model.config._name_or_path)
    with torch.no_grad():
        ident.model.layers[2].self_attn.o_proj.weight.zero_()
        ident.model.layers[2].mlp.down_proj.weight.zero_()
    z = depth_masks(ident, calibration, PruneShape(64, 4, 3, 192, 2))
    assert z["layer"].tolist() == [1.0, 1.0, 0.0, 1.0]
    assert torch.isfinite(fold(ident, z)(ids).logits).all()
    with pytest.raises(ValueError, match="importance"):
        depth_masks(model, calibration, PruneShape(48, 4, 3, 192, 2))
    with pytest.raises(ValueError, match="target has 3 layers"):
        depth_masks(model, None, PruneShape(64, 4, 3, 192, 2), layers=[0, 1])


def test_random_masks(model, ids):
    target = PruneShape(40, 2, 2, 64, 2)
    a, b, c = (random_masks(model.config, target, s) for s in (0, 0, 1))
    assert all(torch.equal(a[k], b[k]) for k in KINDS)
    assert any(not torch.equal(a[k], c[k]) for k in KINDS)
    small = fold(model, a, target)
    assert PruneShape.from_config(small.config) == target
    assert torch.isfinite(small(ids).logits).all()


def test_calibration_batches_from_jsonl(tokenizer_dir, tmp_path):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    path = tmp_path / "cal.jsonl"
    path.write_text(
        json.dumps({"text": "hello world " * 40})
        + "\n\n"
        + json.dumps({"source": "Q: ", "target": "an answer"})
        + "\n",
        encoding="utf-8",
    )
    batches = calibration_batches(tok, path, num_samples=10, length=16, batch_size=4)
    assert len(batches) == 1 and batches[0]["input_ids"].shape[0] == 2
    assert batches[0]["attention_mask"][0].sum() == 16  # cut to the calibration length
    assert batches[0]["input_ids"][0, 0] == tok.bos_token_id
    n = len(tok("Q: an answer")["input_ids"])
    assert batches[0]["attention_mask"][1].sum() == n
    path.write_text('{"other": 1}\n')
    with pytest.raises(ValueError, match="cal.jsonl:1"):
        calibration_batches(tok, path)


# ------------------------------------------------------------------------------------------------ CLI
def _prune_main():
    spec = importlib.util.spec_from_file_location("prune_cli", ROOT / "prune.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


def test_cli_subprocess(model_dir, tmp_path):
    out = tmp_path / "pruned"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "prune.py"),
            "--method",
            "importance",
            "--pretrained",
            str(model_dir),
            "--target_shape",
            "48,2,3,128,1",
            "--output_dir",
            str(out),
            "--num_calibration_samples",
            "8",
            "--calibration_length",
            "32",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "parameters" in proc.stdout and "459,328" in proc.stdout
    small = AutoModelForCausalLM.from_pretrained(out)
    assert PruneShape.from_config(small.config) == PruneShape(48, 2, 3, 128, 1)
    assert f"{small.num_parameters():,}" in proc.stdout
    assert len(AutoTokenizer.from_pretrained(out)) == 2048


def test_cli_in_process_and_errors(model_dir, tmp_path, capsys):
    main = _prune_main()
    out = tmp_path / "depth"
    assert (
        main(["--method", "depth", "--pretrained", str(model_dir), "--keep_layers", "0,2,3", "--output_dir", str(out)])
        == 0
    )
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 3
    assert "kept layers: [0, 2, 3]" in capsys.readouterr().out
    cases = [
        (["--method", "random", "--target_shape", "80,4,4,192,2"], "larger than the source"),
        (["--method", "random", "--target_shape", "48,3,3,128,2"], "not divisible"),
        (["--method", "random", "--target_shape", "48,2,3,128,1", "--output_dir", str(out)], "exists"),
        (["--method", "depth", "--target_shape", "48,4,3,192,2"], "importance"),
        (["--method", "random", "--target_shape", "48,2,3,128,1", "--keep_layers", "0"], "keep_layers"),
        (["--method", "random", "--target_shape", "48,2,3,128,1", "--match_params"], "--match_params is for"),
    ]
    for args, message in cases:
        if "--output_dir" not in args:
            args = args + ["--output_dir", str(tmp_path / "never")]
        assert main(args + ["--pretrained", str(model_dir)]) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("prune.py: error:") and message in err and err.count("\n") == 1, (args, err)
    assert not (tmp_path / "never").exists()
    assert (
        main(
            [
                "--method",
                "random",
                "--pretrained",
                str(model_dir),
                "--target_shape",
                "48,2,3,128,1",
                "--output_dir",
                str(out),
                "--overwrite",
            ]
        )
        == 0
    )
    assert json.loads((out / "config.json").read_text())["hidden_size"] == 48


def test_depth_with_match_params_keeps_the_layers_closest_to_the_targets_size(model_dir, tmp_path, capsys):
    """prune.py --method depth --match_params on a width target: the source's width, and the layer count whose
    parameter count is closest to the target's (one layer more or less would be further off)."""
    main = _prune_main()
    out = tmp_path / "depth"
    args = ["--method", "depth", "--pretrained", str(model_dir), "--target_shape", "48,4,4,192,2"]
    assert main([*args, "--match_params", "--num_calibration_samples", "8", "--output_dir", str(out)]) == 0
    small = AutoModelForCausalLM.from_pretrained(out)
    source = PruneShape.from_config(AutoModelForCausalLM.from_pretrained(model_dir).config)
    shape = PruneShape.from_config(small.config)
    assert (shape.hidden, shape.heads, shape.intermediate, shape.kv_heads) == (64, 4, 192, 2)
    assert 1 <= shape.layers < source.layers
    want = PruneShape(48, 4, 4, 192, 2).num_params(small.config.vocab_size, small.config.head_dim, False)
    per_layer = sum(p.numel() for p in small.model.layers[0].parameters())
    have = small.num_parameters()
    for other in (have - per_layer if shape.layers > 1 else None, have + per_layer):
        if other is not None:
            assert abs(have - want) <= abs(other - want), (have, other, want)
    assert "kept layers: " in capsys.readouterr().out

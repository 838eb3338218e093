"""The prune stage, dynamic loading and distillation inside the real trainer, on 2 CPU processes."""

import json
import math

import pytest
import torch
from conftest import ROOT, run_distributed
from test_train import tb_scalars
from transformers import AutoConfig, AutoModelForCausalLM

from colossal_shear.pruning.shape import PruneShape
from colossal_shear.report import make_report

TRAIN = ROOT / "train.py"
TARGET = "48,2,3,128"


def _prune_args(model_dir, dataset, tmp, plugin, *extra):
    return [
        "--stage",
        "prune",
        "--pretrained",
        model_dir,
        "--dataset",
        dataset,
        "--eval_dataset",
        dataset,
        "--eval_interval",
        2,
        "--dynamic_loading",
        "--reference_loss",
        "code=7,en=7,zh=7.2",
        "--plugin",
        plugin,
        "--mixed_precision",
        "fp32",
        "--batch_size",
        2,
        "--max_steps",
        6,
        "--lr",
        1e-3,
        "--warmup_steps",
        1,
        "--target_shape",
        TARGET,
        "--lagrangian_warmup_steps",
        2,
        "--save_interval",
        3,
        "--save_dir",
        tmp / "ckpt",
        "--tensorboard_dir",
        tmp / "tb",
        "--export_dir",
        tmp / "export",
        *extra,
    ]


# zero2: distilled from the parent too (the teacher's KL resumes exactly with the rest)
PARENT = ["--teacher", "parent", "--kd_weight", 0.5, "--kd_temperature", 2.0, "--lm_weight", 0.5]


@pytest.mark.parametrize("plugin,tied,kd", [("ddp", False, []), ("zero2", True, PARENT)])
def test_prune_stage_resumes_exactly_and_exports_the_target_shape(
    plugin, tied, kd, model_dir, tied_model_dir, dataset, tmp_path
):
    model_dir = tied_model_dir if tied else model_dir
    full, part = tmp_path / "full", tmp_path / "part"
    proc = run_distributed(TRAIN, *_prune_args(model_dir, dataset, full, plugin, *kd))
    # 6 steps cannot settle the masks: said before training and, with the gaps, before folding
    assert "prune steps with a 2-step target ramp" in proc.stderr
    assert "the masks did NOT converge" in proc.stderr
    root = tmp_path / "tb-root"
    root.mkdir()
    (root / "prune").symlink_to(full / "tb")
    report, summary = make_report(root, tmp_path / "report")
    assert "NOT converged" in dict(summary)["prune convergence (sparsity gap to target)"]
    assert "WARNING: the prune stage did not converge" in report.read_text()
    run_distributed(TRAIN, *_prune_args(model_dir, dataset, part, plugin, *kd, "--stop_at_step", 3))
    assert not (part / "export").exists()
    run_distributed(TRAIN, *_prune_args(model_dir, dataset, part, plugin, *kd, "--load_checkpoint", part / "ckpt"))
    tags = ["train/loss", "prune/expected_params", "prune/lambda_1/layers", "domain_weight/zh"]
    if kd:
        kl = tb_scalars(full / "tb", "train/kd_loss")
        assert all(v > 0 for v in kl.values()) and len(kl) == 6, kl  # gates close: the parent differs
        tags.append("train/kd_loss")
    for tag in tags:
        expected, got = tb_scalars(full / "tb", tag), tb_scalars(part / "tb", tag)
        for step in range(3, 7):
            if step in expected:
                assert got[step] == pytest.approx(expected[step], rel=1e-6, abs=1e-7), (tag, step)
    # the multipliers answer the gap (6 steps are too few for the masks to follow: the 200-step test checks that)
    lam = tb_scalars(full / "tb", "prune/lambda_1/layers")
    assert abs(lam[6]) > abs(lam[1]) > 0, "the multipliers did not respond to the shape gap"

    config = AutoConfig.from_pretrained(full / "export")
    shape = PruneShape.from_config(config)
    assert shape == PruneShape.parse(TARGET, AutoConfig.from_pretrained(model_dir))
    model = AutoModelForCausalLM.from_pretrained(full / "export")  # plain HF, no custom code
    assert config.tie_word_embeddings == tied
    assert sum(p.numel() for p in model.parameters()) == shape.num_params(config.vocab_size, config.head_dim, tied)
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 5, 9, 200]])).logits).all()


def test_default_pruning_converges_within_200_steps_with_log_alpha_clamped(model_dir, dataset, tmp_path):
    """Default pruning hyperparameters (one process: the masks are replicated, so one rank shows the dynamics)."""
    tb = tmp_path / "tb" / "prune"
    proc = run_distributed(
        TRAIN,
        "--stage",
        "prune",
        "--pretrained",
        model_dir,
        "--dataset",
        dataset,
        "--plugin",
        "ddp",
        "--mixed_precision",
        "fp32",
        "--batch_size",
        2,
        "--max_steps",
        200,
        "--lr",
        1e-3,
        "--target_shape",
        TARGET,
        "--log_interval",
        50,
        "--tensorboard_dir",
        tb,
        "--export_dir",
        tmp_path / "export",
        nproc=1,
    )
    assert "WARNING" not in proc.stderr
    gaps = {}
    for dim in ("hidden", "layers", "heads", "intermediate"):  # TARGET shrinks these (kv_heads stays)
        expected = tb_scalars(tb, f"prune/expected_sparsity/{dim}")
        target = tb_scalars(tb, f"prune/target_sparsity/{dim}")
        assert target[200] > 0, dim
        gaps[dim] = abs(expected[200] - target[200])
    assert all(g <= 0.03 for g in gaps.values()), gaps
    assert f"heads {gaps['heads']:.3f}" in proc.stdout.split("convergence |expected - target| sparsity:")[1]
    low, high = tb_scalars(tb, "prune/log_alpha_min"), tb_scalars(tb, "prune/log_alpha_max")
    assert min(low.values()) >= math.log(0.01) - 1e-5 and max(high.values()) <= math.log(100) + 1e-5
    assert min(low.values()) < math.log(0.01) + 0.5, "no gate was pushed to the lower clamp: the check is vacuous"
    _, summary = make_report(tmp_path / "tb", tmp_path / "report")
    row = dict(summary)["prune convergence (sparsity gap to target)"]
    assert "NOT converged" not in row and f"heads {gaps['heads']:.3f}" in row


def test_dynamic_loading_follows_the_update_rule(model_dir, dataset, tmp_path):
    """Reference losses from --reference_model; after each eval, w = (1-c) softmax(ln w + L - L_ref) + c/k."""
    run_distributed(
        TRAIN,
        "--pretrained",
        model_dir,
        "--dataset",
        dataset,
        "--eval_dataset",
        dataset,
        "--eval_interval",
        2,
        "--dynamic_loading",
        "--reference_model",
        model_dir,
        "--plugin",
        "ddp",
        "--mixed_precision",
        "fp32",
        "--batch_size",
        2,
        "--max_steps",
        4,
        "--lr",
        3e-3,
        "--tensorboard_dir",
        tmp_path / "tb",
    )
    cats = ["code", "en", "zh"]
    ref = {c: tb_scalars(tmp_path / "tb", f"domain_reference/{c}")[0] for c in cats}
    manifest = json.loads((dataset / "manifest.json").read_text())
    counts = {c: sum(p["categories"].get(c, {}).get("sequences", 0) for p in manifest["parts"]) for c in cats}
    w = {c: counts[c] / sum(counts.values()) for c in cats}
    assert {c: tb_scalars(tmp_path / "tb", f"domain_weight/{c}")[0] for c in cats} == pytest.approx(w, rel=1e-6)
    for step in (2, 4):
        losses = {c: tb_scalars(tmp_path / "tb", f"eval/loss/{c}")[step] for c in cats}
        logits = {c: math.log(w[c]) + losses[c] - ref[c] for c in cats}
        z = sum(math.exp(v) for v in logits.values())
        w = {c: (1 - 1e-4) * math.exp(logits[c]) / z + 1e-4 / 3 for c in cats}
        got = {c: tb_scalars(tmp_path / "tb", f"domain_weight/{c}")[step] for c in cats}
        assert got == pytest.approx(w, rel=1e-4)


def test_distillation_from_an_identical_teacher_starts_at_zero(model_dir, dataset, tmp_path):
    run_distributed(
        TRAIN,
        "--pretrained",
        model_dir,
        "--dataset",
        dataset,
        "--teacher",
        model_dir,
        "--kd_weight",
        0.5,
        "--kd_temperature",
        2.0,
        "--plugin",
        "zero2",
        "--mixed_precision",
        "fp32",
        "--batch_size",
        2,
        "--max_steps",
        3,
        "--lr",
        1e-2,
        "--tensorboard_dir",
        tmp_path / "tb",
    )
    kd = tb_scalars(tmp_path / "tb", "train/kd_loss")
    assert abs(kd[1]) < 1e-5, "teacher == student must give KL 0"
    assert kd[3] > 1e-4, "the student moved away from the teacher, KL must grow"


def test_distillation_from_the_parent_matches_a_reference_under_ddp_and_zero2(model_dir, tmp_path):
    """--teacher parent: the hook's KL term (the boosted model run again with its masks bypassed) equals the KL of the
    unmasked vs the masked model's full logits by hand, is 0 with every gate open, and one engine step moves the
    weights by the gradient of lm_weight x LM + kd_weight x KL by hand (lm_weight 0: the KL-only gradient; under ddp
    with non-reentrant activation checkpointing, whose recomputation must see the student's gates again)."""
    run_distributed(ROOT / "tests" / "workers" / "parent_distill.py", "--model", model_dir, "--out", tmp_path)
    for rank in (0, 1):
        for v in json.loads((tmp_path / f"rank{rank}.json").read_text())["variants"]:
            where = (rank, v["plugin"], v["lm_loss"])
            assert abs(v["kl_open"]) < 1e-6, where
            assert v["kl"] > 1e-3, where  # some gates are closed: the check below is not vacuous
            assert v["kl"] == pytest.approx(v["kl_ref"], rel=1e-5), where
            assert v["lm_logged"] == pytest.approx(v["lm_ref"], rel=1e-5), where  # the log: the plain LM loss
            assert v["update_err"] < 1e-4 * v["grad_max"], where
            assert v["z_kept"], where


@pytest.mark.parametrize(
    "args, match",
    [
        (["--teacher", "parent"], "--teacher parent works with --stage prune only"),
        (["--stage", "prune", "--teacher", "parent", "--plugin", "gemini"], "use ddp, zero2, zero2_cpu"),
        (["--lm_weight", "0"], "--lm_weight 0 needs a --teacher"),
        (["--lm_weight", "-1", "--teacher", "t"], "--lm_weight must not be negative"),
    ],
)
def test_distillation_option_errors_are_one_line(args, match):
    from colossal_shear.core.config import parse
    from colossal_shear.core.errors import ConfigError
    from colossal_shear.train.config import TrainConfig

    with pytest.raises(ConfigError, match=match) as err:
        parse(TrainConfig, args)
    assert "\n" not in str(err.value)

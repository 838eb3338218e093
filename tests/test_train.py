"""The trainer: exact resume on every CPU plugin, packed-document isolation, bucket order, export, freezing,
NaN handling and the pre-flight errors."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, run_distributed
from transformers import AutoModelForCausalLM, AutoTokenizer

from colossal_shear.bundled import build_tiny_llama, corpus_files, train_sentencepiece
from colossal_shear.core.config import parse
from colossal_shear.core.errors import ConfigError, UserError
from colossal_shear.data import PrepareConfig, prepare_dataset
from colossal_shear.data.collator import block_causal_mask, collate
from colossal_shear.data.sampler import BucketSampler
from colossal_shear.train.config import TrainConfig
from colossal_shear.train.preflight import preflight

TRAIN = ROOT / "train.py"


def tb_scalars(logdir, tag="train/loss") -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir))
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)}


def _args(model_dir, dataset, tmp, *extra, steps=6):
    return [
        "--pretrained",
        model_dir,
        "--dataset",
        dataset,
        "--mixed_precision",
        "fp32",
        "--batch_size",
        2,
        "--max_steps",
        steps,
        "--lr",
        3e-3,
        "--warmup_steps",
        2,
        "--save_interval",
        3,
        "--save_dir",
        tmp / "ckpt",
        "--tensorboard_dir",
        tmp / "tb",
        *extra,
    ]


RESUME_CASES = {
    "ddp": ["--plugin", "ddp"],
    "zero2": ["--plugin", "zero2"],
    "zero2_cpu": ["--plugin", "zero2_cpu"],
    "3d_tp2": ["--plugin", "3d", "--tp", "2"],
    "3d_pp2": ["--plugin", "3d", "--pp", "2", "--microbatch_size", "1"],
}


@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_stopped_and_resumed_run_follows_uninterrupted_run(case, model_dir, dataset, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    run_distributed(TRAIN, *_args(model_dir, dataset, full, *RESUME_CASES[case]))
    run_distributed(TRAIN, *_args(model_dir, dataset, part, *RESUME_CASES[case], "--stop_at_step", 3))
    assert (part / "ckpt" / "latest").read_text().strip() == "step-0000003"
    run_distributed(TRAIN, *_args(model_dir, dataset, part, *RESUME_CASES[case], "--load_checkpoint", part / "ckpt"))
    expected, got = tb_scalars(full / "tb"), tb_scalars(part / "tb")
    assert sorted(expected) == list(range(1, 7))
    assert expected[6] < expected[1]
    for step in range(1, 7):
        assert got[step] == pytest.approx(expected[step], abs=1e-6, rel=0), f"step {step}: {got} vs {expected}"
    assert sorted(p.name for p in (part / "ckpt").glob("step-*")) == ["step-0000003", "step-0000006"]


def test_export_freeze_and_eval(model_dir, dataset, tmp_path):
    """Align stage: only embeddings and LM head move; the export is a plain HF model that loads in one call."""
    export = tmp_path / "export"
    proc = run_distributed(
        TRAIN,
        *_args(
            model_dir,
            dataset,
            tmp_path,
            "--plugin",
            "ddp",
            "--freeze_non_embeds_params",
            "--export_dir",
            export,
            "--eval_dataset",
            dataset,
            steps=3,
        ),
    )
    assert "eval step 3 |" in proc.stdout
    src = AutoModelForCausalLM.from_pretrained(model_dir).state_dict()
    out_model = AutoModelForCausalLM.from_pretrained(export)
    assert AutoTokenizer.from_pretrained(export)("hello").input_ids
    out = out_model.state_dict()
    assert out.keys() == src.keys()
    for name in src:
        changed = not torch.equal(src[name], out[name])
        assert changed == (name in ("model.embed_tokens.weight", "lm_head.weight")), name
    saved = (tmp_path / "ckpt" / "config.yaml").read_text()
    assert "stage: align" in saved  # --freeze_non_embeds_params is an alias of --stage align
    scalars = tb_scalars(tmp_path / "tb", "eval/loss/en")
    assert list(scalars) == [3]


def test_nan_steps_are_skipped_then_stop_with_a_clear_error(model_dir, dataset, tmp_path):
    with pytest.raises(AssertionError) as err:
        run_distributed(
            TRAIN,
            *_args(
                model_dir,
                dataset,
                tmp_path,
                "--plugin",
                "ddp",
                "--lr",
                "1e30",
                "--grad_clip",
                0,
                "--max_bad_steps",
                2,
                "--warmup_steps",
                0,
                steps=8,
            ),
        )
    assert "2 consecutive steps had a NaN/inf loss" in str(err.value)
    skipped = tb_scalars(tmp_path / "tb", "train/skipped_steps")
    assert max(skipped.values()) == 2


def test_packed_documents_do_not_attend_to_each_other(model_dir):
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32, attn_implementation="sdpa")
    g = torch.Generator().manual_seed(0)
    a, b = torch.randint(3, 2000, (10,), generator=g), torch.randint(3, 2000, (7,), generator=g)
    packed = torch.cat([a, b, torch.zeros(3, dtype=torch.long)])
    batch = collate(
        {"input_ids": [packed.tolist()], "labels": [packed.tolist()], "doc_lengths": [[10, 7]], "category": ["x"]}
    )
    assert batch["position_ids"][0].tolist() == list(range(10)) + list(range(7)) + list(range(3))
    mask = block_causal_mask(batch["segment_ids"], torch.float32)
    with torch.no_grad():
        together = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], attention_mask=mask).logits
        alone = model(input_ids=b[None]).logits
        unmasked = model(input_ids=batch["input_ids"]).logits
    torch.testing.assert_close(together[0, 10:17], alone[0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(unmasked[0, 10:17], alone[0], atol=1e-3)  # without the mask, B sees A


def test_sampler_keeps_bucket_order_shards_ranks_and_resumes():
    sizes = [5, 4, 3]
    ranks = [BucketSampler(sizes, r, 2, seed=7) for r in range(2)]
    taken = [s.take(6) for s in ranks]  # one epoch: 12 sequences over 2 ranks
    order = [taken[i % 2][i // 2] for i in range(12)]
    assert sorted(order) == list(range(12))
    assert (
        [min(range(12), key=lambda k: k) for _ in [0]]
        and all((0 <= x < 5) for x in order[:5])
        and all(5 <= x < 9 for x in order[5:9])
        and all(x >= 9 for x in order[9:])
    )
    fresh = BucketSampler(sizes, 0, 2, seed=7)
    fresh.take(2)
    state = fresh.state_dict()
    resumed = BucketSampler(sizes, 0, 2, seed=7)
    resumed.load_state_dict(state)
    assert resumed.take(8) == fresh.take(8)  # crosses into the next epoch identically
    with pytest.raises(ValueError, match="another dataset"):
        BucketSampler([5, 4], 0, 2).load_state_dict(state)


@pytest.fixture(scope="module")
def other_dataset(tmp_path_factory):
    """A dataset tokenised with a different (smaller) tokenizer: must be refused."""
    root = tmp_path_factory.mktemp("other")
    tok = train_sentencepiece(root / "tok", vocab_size=1500)
    build_tiny_llama(root / "tiny", tok)
    out = root / "prepared"
    prepare_dataset(
        PrepareConfig(
            data_input_dirs=[str(corpus_files()[0])],
            tokenizer_dir=str(tok),
            data_output_dirs=str(out),
            max_length=64,
            num_spliced_dataset_bins=1,
            num_proc=1,
            progress=False,
        )
    )
    return out


def test_preflight_errors(model_dir, dataset, other_dataset, tmp_path, monkeypatch):
    def check(match, *extra, world=1):
        monkeypatch.setenv("WORLD_SIZE", str(world))
        cfg = parse(TrainConfig, ["--pretrained", model_dir, "--dataset", dataset, *extra])
        with pytest.raises(UserError) as err:
            preflight(cfg)
        assert match in str(err.value), str(err.value)

    check("prepared with tokenizer", "--dataset", other_dataset)
    check("must divide the attention heads (4)", "--plugin", "3d", "--tp", 3, world=3)
    check("larger than the model's 4 layers", "--plugin", "3d", "--pp", 8, world=8)
    if not torch.cuda.is_available():
        check("--plugin gemini cannot run on this CPU-only machine", "--plugin", "gemini")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    check("is not a writable directory", "--save_dir", blocker / "ckpt")
    check("no config.json", "--pretrained", tmp_path)
    check("--stage prune needs --target_shape", "--stage", "prune", "--export_dir", tmp_path / "x")
    check("larger than the source", "--stage", "prune", "--target_shape", "128,4,4,192", "--export_dir", tmp_path / "x")
    check(
        "--stage prune runs under ddp, zero2",
        "--stage",
        "prune",
        "--target_shape",
        "48,2,3,128",
        "--plugin",
        "3d",
        "--tp",
        2,
        "--export_dir",
        tmp_path / "x",
        world=2,
    )
    check("needs --eval_dataset and --eval_interval", "--dynamic_loading", "--reference_loss", "en=1")
    check(
        "--reference_loss names ['en']",
        "--dynamic_loading",
        "--reference_loss",
        "en=1",
        "--eval_dataset",
        dataset,
        "--eval_interval",
        2,
    )
    check("--teacher", "--teacher", tmp_path)
    check("--teacher vocab size 1500 differs", "--teacher", other_dataset.parent / "tiny")


def test_positions_and_cli_error_exit(model_dir, tokenizer_dir, tmp_path):
    """max_length beyond the model's positions, through the real CLI: exit code 2 and one clear line."""
    long = tmp_path / "long"
    prepare_dataset(
        PrepareConfig(
            data_input_dirs=[str(corpus_files()[0])],
            tokenizer_dir=str(tokenizer_dir),
            data_output_dirs=str(long),
            max_length=1024,
            num_spliced_dataset_bins=1,
            num_proc=1,
            progress=False,
        )
    )
    proc = subprocess.run(
        [sys.executable, str(TRAIN), "--pretrained", str(model_dir), "--dataset", str(long)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert proc.returncode == 2
    assert "larger than the model's 512 positions" in proc.stderr


def test_yaml_config_and_flag_precedence(tmp_path):
    cfg_file = tmp_path / "stage.yaml"
    cfg_file.write_text("lr: 0.001\nbatch_size: 4\ndataset: data/a\n")
    cfg = parse(TrainConfig, ["--config", cfg_file, "--batch_size", "8"])
    assert (cfg.optim.lr, cfg.optim.batch_size, cfg.data.dataset, cfg.parallel.plugin) == (
        0.001,
        8,
        ["data/a"],
        "zero2",
    )
    cfg_file.write_text("learning_rate: 1\n")
    with pytest.raises(ConfigError, match="unknown option 'learning_rate'"):
        parse(TrainConfig, ["--config", cfg_file])


def test_tied_embeddings_checkpoint_resume_and_export(tied_model_dir, dataset, tmp_path):
    """Tied embeddings share memory, which safetensors refuses: checkpoints and exports must still work."""
    args = _args(tied_model_dir, dataset, tmp_path, "--plugin", "zero2", "--export_dir", tmp_path / "export", steps=4)
    run_distributed(TRAIN, *args, "--stop_at_step", 2)
    run_distributed(TRAIN, *args, "--load_checkpoint", tmp_path / "ckpt")
    assert sorted(tb_scalars(tmp_path / "tb")) == [1, 2, 3, 4]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "export")
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    src = AutoModelForCausalLM.from_pretrained(tied_model_dir)
    assert not torch.equal(src.model.embed_tokens.weight, model.model.embed_tokens.weight)  # trained


def test_load_checkpoint_from_a_hf_directory_loads_weights_only(model_dir, tied_model_dir, dataset, tmp_path):
    """--load_checkpoint HF_DIR starts from those weights (fresh optimizer, step 0) instead of --pretrained's."""
    run_distributed(
        TRAIN,
        "--pretrained",
        model_dir,
        "--load_checkpoint",
        tied_model_dir,
        "--dataset",
        dataset,
        "--plugin",
        "ddp",
        "--mixed_precision",
        "fp32",
        "--batch_size",
        2,
        "--max_steps",
        1,
        "--lr",
        0.0,
        "--export_dir",
        tmp_path / "export",
        "--tensorboard_dir",
        tmp_path / "tb",
    )
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "export")
    assert exported.config.tie_word_embeddings
    src = AutoModelForCausalLM.from_pretrained(tied_model_dir).state_dict()
    for name, value in exported.state_dict().items():
        assert torch.equal(value, src[name]), name  # lr 0: the loaded weights, unchanged
    assert list(tb_scalars(tmp_path / "tb")) == [1]


def test_natural_yaml_trains_and_the_saved_config_reproduces_the_run(model_dir, dataset, tmp_path):
    """A hand-written YAML with natural values (1e-3 is a string to PyYAML, "3" a string) trains like the same
    flags; the config.yaml a run saves, given back with --config and new output paths, reproduces its losses."""
    flags, natural, again = tmp_path / "flags", tmp_path / "natural", tmp_path / "again"
    run_distributed(TRAIN, *_args(model_dir, dataset, flags, "--plugin", "ddp", steps=3))
    cfg = tmp_path / "natural.yaml"
    cfg.write_text(
        f"pretrained: {model_dir}\ndataset: {dataset}\nparallel:\n  plugin: ddp\n  mixed_precision: fp32\n"
        f"batch_size: 2\nmax_steps: '3'\nlr: 3e-3\nwarmup_steps: 2.0\nsave_interval: 3\n"
        f"save_dir: {natural / 'ckpt'}\ntensorboard_dir: {natural / 'tb'}\noverwrite: no\n"
    )
    run_distributed(TRAIN, "--config", cfg)
    run_distributed(
        TRAIN,
        "--config",
        natural / "ckpt" / "config.yaml",
        "--save_dir",
        again / "ckpt",
        "--tensorboard_dir",
        again / "tb",
    )
    expected = tb_scalars(flags / "tb")
    assert sorted(expected) == [1, 2, 3]
    for run in (natural, again):
        got = tb_scalars(run / "tb")
        assert got == pytest.approx(expected, abs=1e-6, rel=0), run.name


def test_a_new_stage_plugs_in_as_a_hook(model_dir, dataset, tmp_path):
    """A StageHooks subclass added to the Trainer gets every call in order, its state is checkpointed and resumed,
    and its export transform shapes the export, with no change to the loop."""
    worker = ROOT / "tests" / "workers" / "hooked_train.py"
    args = _args(
        model_dir,
        dataset,
        tmp_path,
        "--plugin",
        "zero2",
        "--accumulation_steps",
        2,
        "--export_dir",
        tmp_path / "export",
        steps=4,
    )
    log = tmp_path / "hooks"
    run_distributed(worker, *args, "--stop_at_step", 2, env={"HOOK_LOG": str(log)})
    first = json.loads((tmp_path / "hooks.rank-1.json").read_text())
    assert first["calls"][:6] == [
        "start",
        "before_forward 0 0",
        "extra_loss 0",
        "after_backward 0",
        "before_forward 0 1",
        "extra_loss 0",
    ]
    assert first["calls"][6:8] == ["after_backward 0", "after_optimizer_step 0 True"]
    assert first["counter"] == 2
    run_distributed(worker, *args, "--load_checkpoint", tmp_path / "ckpt", env={"HOOK_LOG": str(log)})
    second = json.loads((tmp_path / "hooks.rank-0.json").read_text())
    assert second["calls"][0] == "loaded 2" and "start" not in second["calls"]
    assert second["calls"][1] == "before_forward 2 0"
    assert second["counter"] == 4
    assert tb_scalars(tmp_path / "tb", "recorder/counter") == {1: 1.0, 2: 2.0, 3: 3.0, 4: 4.0}
    assert json.loads((tmp_path / "export" / "config.json").read_text())["recorded_steps"] == 4


def test_the_loop_does_not_branch_on_plugin_or_stage():
    import inspect

    from colossal_shear.train.trainer import Trainer

    for method in (Trainer.train, Trainer.train_step, Trainer.log_step, Trainer.evaluate):
        source = inspect.getsource(method)
        for word in ("plugin", "pruner", "teacher", "stage", "pipeline", "ddp"):
            assert word not in source, f"Trainer.{method.__name__} mentions {word!r}"


def test_truncated_checkpoint_state_is_refused_naming_the_file(model_dir, dataset, tmp_path):
    args = _args(model_dir, dataset, tmp_path, "--plugin", "ddp", steps=4)
    run_distributed(TRAIN, *args, "--stop_at_step", 3)
    state = tmp_path / "ckpt" / "step-0000003" / "trainer_state.pt"
    state.write_bytes(state.read_bytes()[:1000])
    with pytest.raises(AssertionError) as err:
        run_distributed(TRAIN, *args, "--load_checkpoint", tmp_path / "ckpt")
    log = str(err.value)
    assert log.count("train.py: error: ") == 1, log
    assert f"no complete, verified checkpoint: {state} has 1000 bytes" in log, log  # no older one to fall back to

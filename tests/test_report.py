"""The run report is made from real tensorboard logs: every stage's loss, eval per category, weights, sparsity."""

from torch.utils.tensorboard import SummaryWriter
from transformers import AutoModelForCausalLM

from colossal_shear.report import make_report


def test_report_from_tensorboard_logs(tmp_path, model_dir, tokenizer_dir):
    tb = tmp_path / "tb"
    for stage, start in (("prune", 5.0), ("continue", 4.0)):
        w = SummaryWriter(tb / stage)
        for step in range(1, 4):
            w.add_scalar("train/loss", start - step * 0.1, step)
            w.add_scalar("eval/loss/en", start - step * 0.2, step)
            if stage == "prune":
                w.add_scalar("prune/expected_sparsity/layers", 0.1 * step, step)
                w.add_scalar("prune/target_sparsity/layers", 0.5, step)
            w.add_scalar("domain_weight/en", 0.5 + 0.1 * step, step)
        w.close()
    texts = tmp_path / "eval.jsonl"
    texts.write_text('{"text": "hello world"}\n{"source": "q", "target": "你好"}\n', encoding="utf-8")
    report, summary = make_report(
        tb, tmp_path / "out", models={"base": model_dir}, tokenizers={"base": tokenizer_dir}, eval_texts=texts
    )
    text = report.read_text()
    rows = dict(summary)
    assert rows["loss (prune)"].startswith("4.9000 → 4.7000 over 3 steps")
    assert rows["loss (continue)"].startswith("3.9000 → 3.7000")
    expected = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(model_dir).parameters())
    assert int(rows["parameters (base)"].replace(",", "")) == expected
    assert 0 < float(rows["tokens per character (base)"]) < 3
    assert "| prune | 4.4000 |" in text and "| continue | 3.4000 |" in text
    # expected sparsity 0.3 against 0.5 at the end: the report says the masks were folded off target
    assert "NOT converged" in rows["prune convergence (sparsity gap to target)"]
    assert "WARNING: the prune stage did not converge" in text
    for png in ("loss_per_stage", "eval_loss_per_category", "domain_weights", "expected_sparsity"):
        assert (tmp_path / "out" / f"{png}.png").stat().st_size > 1000
        assert f"({png}.png)" in text


def test_report_shows_accuracy_and_nats_per_char_per_stage(tmp_path):
    from colossal_shear.eval.results import make_results, write_results

    def scores(acc, acc_norm):
        return {"acc": acc, "acc_norm": acc_norm, "acc_stderr": 0.01, "n": 50}

    def text(nats):
        return {"nats_per_char": nats, "tokens_per_char": 0.5, "loss": 2 * nats, "chars": 100, "tokens": 50, "texts": 2}

    evals = {}
    for name, piqa, wino, zh in (("base", 0.55, 0.5, 3.0), ("replay", 0.6, 0.52, 2.5)):
        r = make_results(name, {"piqa": scores(piqa - 0.01, piqa), "winogrande": scores(wino, None)}, {"zh": text(zh)})
        evals[name] = write_results(tmp_path / f"{name}.json", r)
    evals["missing"] = tmp_path / "nowhere.json"  # a stage not evaluated: left out with a warning
    report, summary = make_report(tmp_path / "no-tb", tmp_path / "out", evals=evals)
    text_md = report.read_text()
    table = text_md.split("## Evaluation per stage")[1]
    assert "| model | piqa acc | winogrande acc | zh nats/char | zh tokens/char |" in table
    assert "| base | 0.5500 | 0.5000 | 3.0000 | 0.5000 |" in table  # acc_norm for piqa, acc for winogrande
    assert "| replay | 0.6000 | 0.5200 | 2.5000 | 0.5000 |" in table and "| missing |" not in table
    assert dict(summary)["eval (replay)"] == "piqa 0.600, winogrande 0.520, zh 2.500 nats/char"
    for png in ("accuracy_per_stage", "nats_per_char_per_stage"):
        assert (tmp_path / "out" / f"{png}.png").stat().st_size > 1000 and f"({png}.png)" in text_md

"""Evaluation of any exported model: downstream accuracy through lm-evaluation-harness on benchmark data fetched once
into the cache (`benchmarks`, `harness`), tokenizer-independent text metrics per category (`text`), and the
results file and table (`results`); `run.evaluate` is what `evaluate.py` calls. Nothing is imported here, so the CLI's
config (`eval.config`) loads without torch."""

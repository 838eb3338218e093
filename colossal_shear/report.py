"""The run report: `report.md` and PNG plots (loss per stage, eval loss per category, domain weights, expected
sparsity during pruning), made from the tensorboard logs of a run, plus a summary table.

    python -m colossal_shear.report --tensorboard_dir outputs/demo/tensorboard --out outputs/demo \
        [--models base=outputs/demo/base/tiny-llama prune=outputs/demo/prune/export ...] \
        [--tokenizers before=DIR after=DIR --eval_texts FILE.jsonl] \
        [--evals base=outputs/demo/eval/base.json replay=outputs/demo/eval/replay.json ...]

`--evals` takes evaluate.py's results.json per model (stage), in order: accuracy per task and nats per character per
category, as a table and two plots.

Stages are the sub-directories of --tensorboard_dir, in the order of --stages (default: the recipe's order).
"""

from __future__ import annotations

import io
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from colossal_shear.core.config import option
from colossal_shear.core.constants import PRUNE_TOLERANCE
from colossal_shear.core.errors import ConfigError
from colossal_shear.core.fsutil import atomic_write_bytes, atomic_write_text
from colossal_shear.core.logger import get_logger

log = get_logger(__name__)
STAGE_ORDER = ("align", "prune", "continue", "replay")


def read_scalars(logdir: str | os.PathLike) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def prune_convergence(scalars: dict) -> dict[str, float]:
    """{dim: |expected - target| sparsity at the last logged step} for every dim the prune stage shrank."""
    gaps = {}
    for tag, pts in scalars.items():
        if tag.startswith("prune/target_sparsity/") and pts and pts[-1][1] > 0:
            dim = tag.rsplit("/", 1)[1]
            expected = scalars.get(f"prune/expected_sparsity/{dim}")
            if expected:
                gaps[dim] = abs(expected[-1][1] - pts[-1][1])
    return gaps


def count_params(model_dir: str | os.PathLike) -> int:
    """Parameters of a saved HF model, read from the safetensors headers (no weights loaded)."""
    from safetensors import safe_open

    total = 0
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for name in st.keys():
                n = 1
                for d in st.get_slice(name).get_shape():
                    n *= d
                total += n
    return total


def tokens_per_char(tokenizer_dir, texts: list[str]) -> float:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokens = sum(len(tok(t, add_special_tokens=False).input_ids) for t in texts)
    return tokens / max(1, sum(len(t) for t in texts))


def _plot(series: dict[str, list[tuple[int, float]]], title: str, ylabel: str, path: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not any(series.values()):
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, points in series.items():
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="o" if len(points) < 20 else None, markersize=3, label=name)
    ax.set_xlabel("step (stages laid end to end)")
    return _save_plot(fig, ax, path, title, ylabel)


@dataclass
class _RunScalars:
    """A run's curves, stages laid end to end (each stage's steps shifted past the previous stages' last step)."""

    losses: dict = field(default_factory=dict)  # stage -> train loss points
    evals: dict = field(default_factory=dict)  # category -> eval loss points
    weights: dict = field(default_factory=dict)  # "stage: domain" -> weight points
    sparsity: dict = field(default_factory=dict)  # expected_sparsity/dim, target_sparsity/dim -> points
    rows: list = field(default_factory=list)  # (stage, steps, first loss, last loss, {category: final eval loss})
    gaps: dict = field(default_factory=dict)  # the prune stage's convergence gaps


def make_report(
    tensorboard_dir,
    out_dir,
    stages=STAGE_ORDER,
    models: dict | None = None,
    tokenizers: dict | None = None,
    eval_texts=None,
    evals: dict | None = None,
) -> tuple[Path, list[tuple[str, str]]]:
    """Write report.md and the plots; return its path and the summary rows (what, value). `evals`: {model name:
    evaluate.py results.json}, in stage order."""
    tb, out = Path(tensorboard_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    logged = _read_stages(tb, _present_stages(tb, stages))
    results = _read_evals(evals)
    plots = [
        _plot(logged.losses, "training loss per stage", "loss", out / "loss_per_stage.png"),
        _plot(logged.evals, "held-out loss per category", "loss", out / "eval_loss_per_category.png"),
        _plot(logged.weights, "domain weights (dynamic loading)", "weight", out / "domain_weights.png"),
        _plot(logged.sparsity, "expected vs target sparsity during pruning", "sparsity", out / "expected_sparsity.png"),
        *_eval_plots(results, out),
    ]
    summary = _summary(logged, models, tokenizers, eval_texts) + _eval_summary(results)
    lines = ["# Run report", ""] + _convergence_warning(logged.gaps)
    if summary:
        lines += ["| what | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in summary] + [""]
    lines += _final_eval_table(logged.rows) + _eval_table(results)
    for p in plots:
        if p is not None:
            lines += [f"![{p.stem}]({p.name})", ""]
    report = atomic_write_text(out / "report.md", "\n".join(lines))
    return report, summary


def _present_stages(tb: Path, stages) -> list[str]:
    """The stages with logs, in the order of `stages`, then any other sub-directory by name."""
    if not tb.is_dir():
        return []
    return [s for s in stages if (tb / s).is_dir()] + sorted(
        p.name for p in tb.iterdir() if p.is_dir() and p.name not in stages
    )


def _read_stages(tb: Path, present: list[str]) -> _RunScalars:
    logged, offset = _RunScalars(), 0
    for stage in present:
        scalars = read_scalars(tb / stage)
        train = scalars.get("train/loss", [])
        final_eval = _add_stage(logged, stage, scalars, offset)
        if stage == "prune":
            logged.gaps = prune_convergence(scalars)
        logged.rows.append(
            (stage, len(train), train[0][1] if train else None, train[-1][1] if train else None, final_eval)
        )
        offset += max((s for s, _ in train), default=0)
    return logged


def _add_stage(logged: _RunScalars, stage: str, scalars: dict, offset: int) -> dict[str, float]:
    """Add one stage's curves, shifted by `offset` steps; return its final eval loss per category."""

    def shift(pts):
        return [(s + offset, v) for s, v in pts]

    logged.losses[stage] = shift(scalars.get("train/loss", []))
    final_eval = {}
    for tag, pts in scalars.items():
        if tag.startswith("eval/loss/"):
            cat = tag.split("/", 2)[2]
            logged.evals.setdefault(cat, []).extend(shift(pts))
            final_eval[cat] = pts[-1][1]
        elif tag.startswith("domain_weight/"):
            logged.weights.setdefault(f"{stage}: {tag.split('/', 1)[1]}", []).extend(shift(pts))
        elif tag.startswith("prune/expected_sparsity/") or tag.startswith("prune/target_sparsity/"):
            logged.sparsity[tag.split("/", 1)[1]] = shift(pts)
    return final_eval


def _not_converged(gaps: dict) -> dict:
    return {k: v for k, v in gaps.items() if v > PRUNE_TOLERANCE}


def _convergence_warning(gaps: dict) -> list[str]:
    off = _not_converged(gaps)
    if not off:
        return []
    return [
        "**WARNING: the prune stage did not converge**: |expected - target| sparsity "
        + ", ".join(f"{k} {v:.3f}" for k, v in off.items())
        + f" (> {PRUNE_TOLERANCE}) at its last step; "
        "the folded model was forced to the target shape. Give it more steps (docs/pruning.md).",
        "",
    ]


def _summary(logged: _RunScalars, models, tokenizers, eval_texts) -> list[tuple[str, str]]:
    """(what, value): prune convergence, tokens per character, parameter counts, each stage's loss."""
    summary = []
    if logged.gaps:
        gaps = ", ".join(f"{k} {v:.3f}" for k, v in logged.gaps.items())
        summary.append(
            (
                "prune convergence (sparsity gap to target)",
                gaps + (" (NOT converged)" if _not_converged(logged.gaps) else ""),
            )
        )
    if tokenizers and eval_texts:
        from colossal_shear.data.records import texts as read_texts

        texts = list(read_texts([eval_texts]))
        for name, path in tokenizers.items():
            summary.append((f"tokens per character ({name})", f"{tokens_per_char(path, texts):.4f}"))
    for name, path in (models or {}).items():
        if Path(path).is_dir():
            summary.append((f"parameters ({name})", f"{count_params(path):,}"))
    for stage, n, first, last, _final_eval in logged.rows:
        if last is not None:
            summary.append((f"loss ({stage})", f"{first:.4f} → {last:.4f} over {n} steps"))
    return summary


def _final_eval_table(rows: list) -> list[str]:
    cats = sorted({c for *_, e in rows for c in e})
    if not cats:
        return []
    return (
        [
            "## Final held-out loss per category",
            "",
            "| stage | " + " | ".join(cats) + " |",
            "|---|" + "---|" * len(cats),
        ]
        + [f"| {s} | " + " | ".join(f"{e[c]:.4f}" if c in e else "" for c in cats) + " |" for s, _, _, _, e in rows]
        + [""]
    )


def _read_evals(evals: dict | None) -> dict[str, dict]:
    """{model name: results.json contents}, in the order given; a missing file is skipped with a warning."""
    from colossal_shear.eval.results import read_results

    out = {}
    for name, path in (evals or {}).items():
        if Path(path).is_file():
            out[name] = read_results(path)
        else:
            log.warning(f"report: no evaluation results at {path} ({name}): left out")
    return out


def _accuracy(scores: dict) -> float | None:
    """A task's headline accuracy: acc_norm where the task has it (lm-eval's custom for ARC, HellaSwag, PIQA...)."""
    return scores["acc_norm"] if scores.get("acc_norm") is not None else scores.get("acc")


def _eval_columns(results: dict) -> tuple[list[str], list[str]]:
    tasks = list(dict.fromkeys(t for r in results.values() for t in r.get("tasks", {})))
    cats = list(dict.fromkeys(c for r in results.values() for c in r.get("text", {})))
    return tasks, cats


def _eval_table(results: dict) -> list[str]:
    """Accuracy per task and nats per character per category, one row per evaluated model (stage)."""
    tasks, cats = _eval_columns(results)
    if not results or not (tasks or cats):
        return []
    head = [f"{t} acc" for t in tasks] + [f"{c} nats/char" for c in cats] + [f"{c} tokens/char" for c in cats]
    lines = ["## Evaluation per stage (evaluate.py)", "", "| model | " + " | ".join(head) + " |"]
    lines.append("|---|" + "---|" * len(head))
    for name, r in results.items():
        cells = [_cell(_accuracy(r["tasks"][t]) if t in r["tasks"] else None) for t in tasks]
        cells += [_cell(r["text"][c]["nats_per_char"] if c in r["text"] else None) for c in cats]
        cells += [_cell(r["text"][c]["tokens_per_char"] if c in r["text"] else None) for c in cats]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    n = {t: next(r["tasks"][t]["n"] for r in results.values() if t in r["tasks"]) for t in tasks}
    if tasks:
        lines += ["", "acc: acc_norm where the task defines it, else acc; documents per task: "
                  + ", ".join(f"{t} {k}" for t, k in n.items())]  # fmt: skip
    return lines + [""]


def _cell(value) -> str:
    return "" if value is None else f"{value:.4f}"


def _eval_plots(results: dict, out: Path) -> list[Path | None]:
    tasks, cats = _eval_columns(results)
    names = list(results)
    accuracy = {
        t: [_accuracy(results[m]["tasks"][t]) if t in results[m]["tasks"] else None for m in names] for t in tasks
    }
    nats = {
        c: [results[m]["text"][c]["nats_per_char"] if c in results[m]["text"] else None for m in names] for c in cats
    }
    return [
        _plot_models(names, accuracy, "accuracy per stage (evaluate.py)", "accuracy", out / "accuracy_per_stage.png"),
        _plot_models(names, nats, "nats per character per stage", "nats/char", out / "nats_per_char_per_stage.png"),
    ]


def _plot_models(names: list[str], series: dict[str, list], title: str, ylabel: str, path: Path) -> Path | None:
    """One line per series over the models in order (x: the model's name)."""
    if not names or not series:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for label, values in series.items():
        xs = [i for i, v in enumerate(values) if v is not None]
        ax.plot(xs, [values[i] for i in xs], marker="o", label=label)
    ax.set_xticks(range(len(names)), names, rotation=20)
    return _save_plot(fig, ax, path, title, ylabel)


def _eval_summary(results: dict) -> list[tuple[str, str]]:
    rows = []
    for name, r in results.items():
        parts = [f"{t} {_accuracy(s):.3f}" for t, s in r.get("tasks", {}).items() if _accuracy(s) is not None]
        parts += [f"{c} {m['nats_per_char']:.3f} nats/char" for c, m in r.get("text", {}).items()]
        if parts:
            rows.append((f"eval ({name})", ", ".join(parts)))
    return rows


def _pairs(items, flag: str) -> dict:
    out = {}
    for item in items or []:
        name, sep, path = item.partition("=")
        if not sep:
            raise ConfigError(f"--{flag}: expected name=path, got {item!r}")
        out[name] = path
    return out


@dataclass
class ReportConfig:
    """The run report (report.md + PNG plots) from a staged run's tensorboard logs."""

    tensorboard_dir: str = option(help="directory holding one tensorboard dir per stage")
    out: str = option(help="where report.md and the PNG plots are written")
    stages: list[str] = option(help="stage order", default_factory=lambda: list(STAGE_ORDER), sep=",")
    models: list[str] = option(help="name=HF_model_dir: parameter counts in the summary", default_factory=list)
    tokenizers: list[str] = option(
        help="name=tokenizer_dir: tokens per character on --eval_texts", default_factory=list
    )
    eval_texts: str | None = option(None, "JSONL records (docs/data_prep.md) or plain text for tokens per character")
    evals: list[str] = option(
        help="name=results.json from evaluate.py, in stage order: accuracy and nats/char per stage",
        default_factory=list,
    )


def run(cfg: ReportConfig):
    return make_report(
        cfg.tensorboard_dir,
        cfg.out,
        cfg.stages,
        _pairs(cfg.models, "models"),
        _pairs(cfg.tokenizers, "tokenizers"),
        cfg.eval_texts,
        _pairs(cfg.evals, "evals"),
    )


def show(result) -> None:
    report, summary = result
    width = max((len(k) for k, _ in summary), default=10)
    log.info(f"report: {report}")
    for k, v in summary:
        log.info(f"  {k:<{width}}  {v}")


def _save_plot(fig, ax, path, title: str, ylabel: str):
    """Title, grid and legend, then the PNG written atomically; the figure is closed."""
    import matplotlib.pyplot as plt

    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    plt.close(fig)
    return atomic_write_bytes(path, png.getvalue())


if __name__ == "__main__":
    from colossal_shear import cli

    sys.exit(cli.run("colossal_shear/report.py", run, show, description=__doc__))

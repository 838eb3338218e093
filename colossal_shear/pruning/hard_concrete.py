"""Hard-concrete (L0) gates of Louizos et al., with the constants Sheared-LLaMA uses.

A gate z in [0, 1] is a stretched, clamped binary-concrete sample: u ~ U(eps, 1-eps),
s = sigmoid((ln u - ln(1-u) + log_alpha) / beta), z = clamp(s * (r - l) + l, 0, 1). The stretch puts a point mass at
exactly 0 and at exactly 1, so gates can switch units fully off while staying differentiable in log_alpha in between.
P(z > 0) = 1 - sigmoid(beta * ln(-l / r) - log_alpha) is the differentiable expected "kept" score.
"""

from __future__ import annotations

import math

import torch
from torch import nn

LIMIT_L = -0.1
LIMIT_R = 1.1
BETA = 2.0 / 3.0
EPS = 1e-6
# log_alpha is kept in [ln 0.01, ln 100] (about +-4.6), as the reference does before every forward: beyond it the
# sigmoid is flat, the gates stop responding and the projection onto the target (constraint.py) has nothing to move.
LOG_ALPHA_MIN = math.log(1e-2)
LOG_ALPHA_MAX = math.log(1e2)


class HardConcrete(nn.Module):
    """`log_alpha` of any shape; every entry is one independent gate."""

    def __init__(
        self,
        shape,
        init_log_alpha: float = 5.0,
        init_std: float = 0.01,
        l: float = LIMIT_L,
        r: float = LIMIT_R,
        beta: float = BETA,
        eps: float = EPS,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        if not (l < 0 < 1 < r):
            raise ValueError(f"hard-concrete needs l < 0 and r > 1 (got l={l}, r={r})")
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        init = torch.full(shape, float(init_log_alpha))
        if init_std:
            init += init_std * torch.randn(shape, generator=generator)
        self.log_alpha = nn.Parameter(init)
        self.l, self.r, self.beta, self.eps = float(l), float(r), float(beta), float(eps)

    def extra_repr(self) -> str:
        return f"shape={tuple(self.log_alpha.shape)}, l={self.l}, r={self.r}, beta={self.beta:.4f}"

    @torch.no_grad()
    def constrain(self) -> None:
        """Clamp log_alpha in place to [LOG_ALPHA_MIN, LOG_ALPHA_MAX]."""
        self.log_alpha.clamp_(LOG_ALPHA_MIN, LOG_ALPHA_MAX)

    def _log_alpha(self) -> torch.Tensor:
        return self.log_alpha.float()

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """A stochastic gate for training (fp32, same shape as log_alpha, differentiable in log_alpha)."""
        la = self._log_alpha()
        u = torch.rand(la.shape, generator=generator, device=la.device, dtype=torch.float32)
        u = u * (1 - 2 * self.eps) + self.eps
        s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + la) / self.beta)
        return (s * (self.r - self.l) + self.l).clamp(0.0, 1.0)

    def deterministic(self) -> torch.Tensor:
        """The evaluation value clamp(sigmoid(log_alpha) * (r - l) + l, 0, 1)."""
        return (torch.sigmoid(self._log_alpha()) * (self.r - self.l) + self.l).clamp(0.0, 1.0)

    def keep_prob(self) -> torch.Tensor:
        """P(z > 0) = 1 - sigmoid(beta * ln(-l / r) - log_alpha), differentiable in log_alpha."""
        return 1 - torch.sigmoid(self.beta * math.log(-self.l / self.r) - self._log_alpha())

    def forward(self, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.sample(generator) if self.training else self.deterministic()

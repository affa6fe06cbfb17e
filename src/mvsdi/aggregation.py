"""How the K per-view gradients of a step become the one gradient the optimiser applies.

Each estimator takes the K views as callables ``loss_of[k]()`` (each builds view k's graph and
returns its full, unscaled loss) and leaves the aggregated gradient in the parameters' ``.grad``.

- ``mean`` (MV-SDI, the paper's step): g = (1/K) Σ_k ∇L(c_k). Each view's loss / K is backwarded
  as soon as it is built, so the gradients add up in ``.grad`` and one view's graph is alive at a
  time: peak memory is that of K=1.
- ``consensus`` (CW-MV-SDI, the reference's ``consensus_weighting`` option): each view's gradient
  g_k from an isolated backward of its full loss is kept; a_k = cos(g_k, Σ_j g_j) over every trained
  parameter (non-finite → 0); w = softmax(s·a) with sharpness s = softplus(τ) (τ trained, or a
  fixed s); the update is Σ_k w_k g_k with w detached. τ is trained on
  L_aux = −λ_cons Σ_k w_k a_k + λ_ent (log K − H(w)) with a detached. Memory: K copies of the
  gradient of every parameter (4 bytes × parameters × K; 67 MB per copy for the default 2^19-entry,
  16-level hash grid), on top of one view's graph.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Literal, Sequence

import torch
import torch.nn.functional as F

from mvsdi.knobs import knob

AGGREGATIONS = ("mean", "consensus")
ViewLoss = Callable[[], torch.Tensor]


@dataclass(frozen=True)
class AggregationConfig:
    kind: Literal["mean", "consensus"] = knob("mean", "how the K per-view gradients become one: mean (MV-SDI) or "
                                                      "consensus (CW-MV-SDI: weights by agreement; keeps K gradient "
                                                      "copies)", flags=("--aggregation",))
    # CW-MV-SDI, with the reference's values
    tau_init: float = knob(-6.0, "consensus: initial τ; softplus(-6) ≈ 0.0025, so the weights start uniform")
    tau_lr: float = knob(0.01, "consensus: learning rate of τ's own Adam group")
    lambda_consensus: float = knob(1.0, "consensus: weight of the agreement term of τ's loss")
    lambda_entropy: float = knob(1.0, "consensus: weight of the entropy term of τ's loss")
    fixed_sharpness: float | None = knob(None, "consensus: a fixed sharpness s instead of a trained τ (the "
                                               "reference's ablation); none: trained")

    def __post_init__(self) -> None:
        if self.kind not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {', '.join(AGGREGATIONS)}, got {self.kind!r}")
        if self.fixed_sharpness is not None and self.fixed_sharpness < 0:
            raise ValueError(f"fixed_sharpness must be >= 0, got {self.fixed_sharpness}")


def mean_gradient(loss_of: Sequence[ViewLoss]) -> dict[str, Any]:
    """g = (1/K) Σ_k ∇L(c_k), accumulated in ``.grad`` one view at a time."""
    for view_loss in loss_of:
        (view_loss() / len(loss_of)).backward()
    return {}


def agreement(gradients: Sequence[Sequence[torch.Tensor | None]]) -> torch.Tensor:
    """a_k = cos(g_k, Σ_j g_j) [K], each g_k given as one tensor (or None: zero) per parameter.

    Computed parameter by parameter (no concatenation of the K flattened gradients), in float64 so
    that the cosine of two 16.7M-entry vectors does not depend on the order of float32 sums.
    """
    views, n_params = len(gradients), len(gradients[0])
    dots = torch.zeros(views, dtype=torch.float64)
    norms = torch.zeros(views, dtype=torch.float64)
    total_norm = torch.zeros((), dtype=torch.float64)
    for i in range(n_params):
        present = [(k, g[i]) for k, g in enumerate(gradients) if g[i] is not None]
        if not present:
            continue
        total = sum(g.double() for _, g in present)
        total_norm += total.pow(2).sum().cpu()
        for k, g in present:
            dots[k] += (g.double() * total).sum().cpu()
            norms[k] += g.double().pow(2).sum().cpu()
    cosine = dots / (norms.sqrt() * total_norm.sqrt())
    return torch.nan_to_num(cosine, nan=0.0, posinf=0.0, neginf=0.0)  # a zero gradient agrees with nothing


class ConsensusWeighting(torch.nn.Module):
    """CW-MV-SDI's weights; τ is a parameter so that checkpoints and Adam carry it like the field's."""

    def __init__(self, config: AggregationConfig):
        super().__init__()
        self.config = config
        self.tau = torch.nn.Parameter(torch.tensor(float(config.tau_init)))

    def sharpness(self) -> torch.Tensor:
        if self.config.fixed_sharpness is not None:
            return torch.tensor(float(self.config.fixed_sharpness), dtype=torch.float64)
        return F.softplus(self.tau).double()

    def trained(self) -> list[torch.nn.Parameter]:
        """τ when it is trained (its own optimiser group); nothing with a fixed sharpness."""
        return [self.tau] if self.config.fixed_sharpness is None else []

    def forward(self, loss_of: Sequence[ViewLoss], parameters: Sequence[torch.nn.Parameter]) -> dict[str, Any]:
        gradients = []
        for view_loss in loss_of:
            for p in parameters:
                p.grad = None
            view_loss().backward()  # the full loss: the weights below make a convex combination
            gradients.append([None if p.grad is None else p.grad.detach().clone() for p in parameters])
        a = agreement(gradients)
        s = self.sharpness()
        w = torch.softmax(s * a, dim=0)
        w_fixed = w.detach()
        for i, p in enumerate(parameters):
            parts = [w_fixed[k].to(g.dtype) * g for k, g in enumerate(g_k[i] for g_k in gradients) if g is not None]
            p.grad = torch.stack(parts).sum(0) if parts else None
        del gradients
        if self.trained():
            entropy = -(w * (w + 1e-12).log()).sum()
            aux = (-self.config.lambda_consensus * (w * a).sum()
                   + self.config.lambda_entropy * (math.log(len(w)) - entropy))
            (grad_tau,) = torch.autograd.grad(aux, self.tau)
            self.tau.grad = grad_tau.to(self.tau.dtype)
        return {"consensus_weights": w_fixed.tolist(), "consensus_agreement": a.tolist(),
                "consensus_sharpness": float(s.detach())}


"""How a reducer combines the members' parts of one chunk: pure tensor arithmetic, no networking.

``mean``: Σ w_j x_j / Σ w_j, accumulated in group order with product and sum rounded separately,
so the result does not depend on how the vector is sliced or chunked, nor on arrival order.

``clip`` (the default, robust): no single part may pull the result far. The parts' weights are
capped at twice the group's median weight (a peer's token count is only its claim). Then, per
chunk, a robust centre v starts at the coordinate-wise median and takes a few CenteredClip steps
(Karimireddy et al. 2021, as used by BTARD) that count every part alike: v ← v + mean_j clip(x_j − v, τ),
with the radius τ = ``tau`` × the median distance of the parts to the starting centre. Finally each
part farther than τ from v is pulled in to distance τ, and the result is the weighted mean of the
parts so bounded.
A part within τ is used exactly as sent: on an all-honest group, where distances concentrate
(high dimension), nothing is clipped and the result is bit for bit the plain mean. A part of huge
values, a sign flip x10 or random noise moves the result by at most τ·w_j/Σw; NaN never gets here
(the codec refuses it).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence

import torch

AGGREGATIONS = ("clip", "mean")
WEIGHT_CAP = 2.0  # a part weighs at most this many times the group's median weight
_CENTRE_STEPS = 3


def bounded_weights(weights: Sequence[float]) -> list[float]:
    """Each weight capped at ``WEIGHT_CAP`` times the median of all (the declared token counts)."""
    cap = WEIGHT_CAP * statistics.median(weights)
    return [min(float(w), cap) for w in weights]


def weighted_mean(parts: list[tuple[float, torch.Tensor]], numel: int) -> tuple[torch.Tensor, float]:
    """Σ w_j x_j / Σ w_j in fp32, in the given order; consumes (scales in place) the parts' tensors.
    Product and sum are rounded separately (no fused multiply-add)."""
    acc, total = torch.zeros(numel, dtype=torch.float32), 0.0
    for weight, values in parts:
        acc.add_(values.mul_(weight))
        total += weight
    return acc.div_(total), total


def _distances(parts: torch.Tensor, centre: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm((parts - centre).double(), dim=1)


def _scales(parts: torch.Tensor, centre: torch.Tensor, radius: float) -> torch.Tensor:
    dist = _distances(parts, centre)
    return torch.where(dist > radius, radius / dist.clamp_min(1e-30), torch.ones_like(dist)).float()


def clip_scales(parts: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(centre, scale per part): the robust centre and how much of each part's deviation from it
    to keep (1.0: the part is used as sent). The centre counts every part alike, whatever its
    weight, so no heavy part drags it; the radius is fixed from the starting point."""
    centre = parts.median(dim=0).values
    radius = tau * float(_distances(parts, centre).median())
    for _ in range(_CENTRE_STEPS):
        scale = _scales(parts, centre, radius)
        centre = centre + ((parts - centre) * scale[:, None]).mean(dim=0)
    return centre, _scales(parts, centre, radius)


def clipped_mean(
    parts: torch.Tensor, weights: Sequence[float], tau: float
) -> tuple[torch.Tensor, float, list[float]]:
    """(average, total weight, scale per part) of the rows of ``parts`` (consumed) with robust clipping."""
    scales = [1.0] * len(parts)
    if len(parts) > 2:
        centre, scale = clip_scales(parts, tau)
        for j, s in enumerate(scale.tolist()):
            if s < 1.0:  # pull this part in to the radius; parts within it stay exactly as sent
                parts[j] = centre + (parts[j] - centre) * s
                scales[j] = s
    average, total = weighted_mean(list(zip(weights, parts, strict=True)), parts.shape[1])
    return average, total, scales

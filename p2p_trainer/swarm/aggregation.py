"""How a reducer combines the members' parts of one chunk: pure tensor arithmetic, no networking.

``mean``: Σ w_j x_j / Σ w_j, accumulated in group order with product and sum rounded separately,
so the result does not depend on how the vector is sliced or chunked, nor on arrival order.

``clip`` (the default, robust): no single part may pull the result far. The parts' weights are
capped at twice the group's median weight (a peer's token count is only its claim). Then, per
chunk, a robust centre v starts at the geometric median of the parts (Weiszfeld's iteration;
like the coordinate-wise median it moves only boundedly however far fewer than half of the parts
stray, and it is found from the parts' k x k inner products alone) and takes a few CenteredClip
steps (Karimireddy et al. 2021, as used by BTARD) that count every part alike:
v <- v + mean_j clip(x_j - v, tau), with the radius tau = ``tau`` x the median distance of the
parts to the starting centre. Finally each part farther than tau from v is pulled in to distance
tau, and the result is the weighted mean of the parts so bounded.
A part within tau is used exactly as sent: on an all-honest group, where distances concentrate
(high dimension), nothing is clipped and the result is bit for bit the plain mean. A part of huge
values, a sign flip x10 or random noise moves the result by at most tau*w_j/sum(w); NaN never gets
here (the codec refuses it).

Cost: v is always a convex combination of the parts, so every distance above is
``G_jj - 2 (G a)_j + a'Ga`` for the coefficients ``a`` of v and the Gram matrix ``G`` of the parts:
one pass over the parts (float64 blocks) computes G, the centre's iterations are k x k arithmetic,
and v itself is built only when some part is clipped. Computing the median and each step on the
full vectors instead took ~20x longer per chunk.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence

import numpy as np
import torch

AGGREGATIONS = ("clip", "mean")
WEIGHT_CAP = 2.0  # a part weighs at most this many times the group's median weight
_CENTRE_STEPS = 3
_MEDIAN_STEPS = 200  # Weiszfeld iterations at most (each is k x k arithmetic)
_GRAM_BLOCK = 1 << 14  # columns per float64 block of the Gram matrix
# a part closer than this (times the parts' rms norm) to the centre is at the centre: distances
# taken from G carry rounding of about 1e-8 of the norms, which must never count as straying
_AT_CENTRE = 1e-6


def bounded_weights(weights: Sequence[float]) -> list[float]:
    """Each weight capped at ``WEIGHT_CAP`` times the median of all (the declared token counts)."""
    cap = WEIGHT_CAP * statistics.median(weights)
    return [min(float(w), cap) for w in weights]


def weighted_mean(
    parts: list[tuple[float, torch.Tensor]], numel: int, out: torch.Tensor | None = None
) -> tuple[torch.Tensor, float]:
    """Σ w_j x_j / Σ w_j in fp32, in the given order; consumes (scales in place) the parts' tensors.
    Product and sum are rounded separately (no fused multiply-add), as ``Codec.decode_accumulate``
    does. ``out``: the accumulator to use (overwritten) instead of a new tensor."""
    acc = torch.zeros(numel, dtype=torch.float32) if out is None else out.zero_()
    total = 0.0
    for weight, values in parts:
        acc.add_(values.mul_(weight))
        total += weight
    return acc.div_(total), total


def gram(parts: torch.Tensor) -> np.ndarray:
    """The k x k inner products of the rows of ``parts``, accumulated in float64 block by block."""
    k, n = parts.shape
    g = torch.zeros(k, k, dtype=torch.float64)
    buffer = torch.empty(k, min(n, _GRAM_BLOCK), dtype=torch.float64)  # stays in cache
    for lo in range(0, n, _GRAM_BLOCK):
        block = buffer[:, : min(_GRAM_BLOCK, n - lo)]
        block.copy_(parts[:, lo : lo + _GRAM_BLOCK])
        g.addmm_(block, block.T)
    return g.numpy()


def _distances(g: np.ndarray, a: np.ndarray) -> np.ndarray:
    """||x_j - v|| for every part j, where v = Σ a_i x_i."""
    ga = g @ a
    return np.sqrt(np.maximum(np.diag(g) - 2.0 * ga + a @ ga, 0.0))


def _scales(dist: np.ndarray, radius: float) -> np.ndarray:
    return np.where(dist > radius, radius / np.maximum(dist, 1e-300), 1.0)


def _geometric_median(g: np.ndarray, tiny: float) -> np.ndarray:
    """Coefficients of the parts' geometric median (Weiszfeld, from their mean)."""
    k = len(g)
    a = np.full(k, 1.0 / k)
    for _ in range(_MEDIAN_STEPS):
        w = 1.0 / np.maximum(_distances(g, a), tiny)
        nxt = w / w.sum()
        done = np.abs(nxt - a).max() < 1e-12
        a = nxt
        if done:
            break
    return a


def clip_scales(g: np.ndarray, tau: float) -> tuple[np.ndarray, np.ndarray]:
    """(coefficients of the robust centre, scale per part) from the parts' Gram matrix ``g``: the
    centre is Σ a_j x_j, and each part keeps ``scale`` of its deviation from it (1.0: used as sent).
    The centre counts every part alike, whatever its weight, so no heavy part drags it; the radius
    is fixed from the starting point."""
    k = len(g)
    rms = float(np.sqrt(max(np.trace(g), 0.0) / k))
    a = _geometric_median(g, max(rms * 1e-12, 1e-300))
    radius = max(tau * float(np.sort(_distances(g, a))[(k - 1) // 2]), _AT_CENTRE * rms)
    for _ in range(_CENTRE_STEPS):
        scale = _scales(_distances(g, a), radius)
        a = a * (1.0 - scale.mean()) + scale / k  # v + mean_j scale_j (x_j - v), kept convex
    return a, _scales(_distances(g, a), radius)


def clipped_mean(
    parts: torch.Tensor, weights: Sequence[float], tau: float, out: torch.Tensor | None = None
) -> tuple[torch.Tensor, float, list[float]]:
    """(average, total weight, scale per part) of the rows of ``parts`` (consumed) with robust
    clipping; ``out`` as in ``weighted_mean``."""
    scales = [1.0] * len(parts)
    if len(parts) > 2:
        a, scale = clip_scales(gram(parts), tau)
        if (scale < 1.0).any():
            centre = torch.from_numpy(a.astype(np.float32)) @ parts
            for j, s in enumerate(scale.tolist()):
                if s < 1.0:  # pull this part in to the radius; parts within it stay exactly as sent
                    parts[j] = centre + (parts[j] - centre) * s
                    scales[j] = s
    average, total = weighted_mean(list(zip(weights, parts, strict=True)), parts.shape[1], out)
    return average, total, scales

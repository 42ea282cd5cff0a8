"""Choose, per source, the few gradient coordinates that carry its signal (CoLM, section 2.4).

Facility location on all ``D`` coordinates is both slow and noisy; each source keeps the
coordinates where its mean normalised gradient is largest in magnitude.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from colm_server.select.normalize import AdamNormalizer
from colm_server.select.sketch import Sketch


def _features(
    sketch: Sketch, normalizer: AdamNormalizer | None, g: torch.Tensor, cols: slice | torch.Tensor
) -> torch.Tensor:
    """``u`` for the columns ``cols`` of ``g`` (``g`` itself when there is no normalizer)."""
    if normalizer is None:
        return g.float()
    normalizer.ensure(sketch.dim, g.device)
    return normalizer.features(g, cols)


def top_coordinates(
    sketch: Sketch,
    normalizer: AdamNormalizer | None,
    groups: Sequence[torch.Tensor],
    k: int,
    block: int = 65536,
) -> list[torch.Tensor]:
    """For each group of rows, the ``k`` coordinates with the largest ``|mean over rows of u|``.

    Reads the sketch one column block at a time and keeps a running top-k per group, so
    memory is ``O(L * block)``. Indices come back sorted ascending; an empty group gets none.
    """
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    dim, n_groups = sketch.dim, len(groups)
    device = getattr(sketch, "device", None)
    none = torch.empty(0, dtype=torch.long, device=device)
    if k >= dim:
        return [torch.arange(dim, device=device) if len(g) else none.clone() for g in groups]
    if k <= 0 or n_groups == 0:
        return [none.clone() for _ in groups]
    best_val: torch.Tensor | None = None
    best_idx: torch.Tensor | None = None
    averaging: torch.Tensor | None = None  # [groups, L]: row r of it averages group r
    for cols, g in sketch.blocks(block):
        u = _features(sketch, normalizer, g, cols)
        if averaging is None:
            averaging = torch.zeros(n_groups, sketch.num_samples, device=u.device)
            for r, rows in enumerate(groups):
                rows = rows.to(u.device)
                averaging[r].index_add_(
                    0, rows, torch.full_like(rows, 1, dtype=u.dtype) / len(rows)
                )
            best_val = torch.empty(n_groups, 0, device=u.device)
            best_idx = torch.empty(n_groups, 0, dtype=torch.long, device=u.device)
        score = (averaging @ u).abs()  # [groups, width]
        idx = torch.arange(cols.start, cols.stop, device=u.device).expand(n_groups, -1)
        cand_val = torch.cat([best_val, score], dim=1)
        cand_idx = torch.cat([best_idx, idx], dim=1)
        best_val, pos = cand_val.topk(min(k, cand_val.shape[1]), dim=1)
        best_idx = cand_idx.gather(1, pos)
    return [
        best_idx[r].sort().values if len(rows) else best_idx.new_empty(0)
        for r, rows in enumerate(groups)
    ]


def gather_features(
    sketch: Sketch,
    normalizer: AdamNormalizer | None,
    rows: torch.Tensor,
    coords: torch.Tensor,
) -> torch.Tensor:
    """``u[rows][:, coords]``, shape ``[len(rows), len(coords)]``: the input to facility location."""
    g = sketch.columns(coords)
    return _features(sketch, normalizer, g[rows.to(g.device)], coords)

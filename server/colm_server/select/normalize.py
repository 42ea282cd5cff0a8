"""Adam-like normalisation of per-sample gradient sketches (CoLM, section 2.3).

Raw zeroth-order gradients are dominated by a few large coordinates; dividing by a
running second moment, as Adam does, makes coordinates comparable before sparsifying.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from colm_server.select.sketch import Sketch

Columns = slice | torch.Tensor


def _cpu_copy(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().cpu().clone()


@dataclass
class AdamNormalizer:
    """Per-coordinate first and second moments carried across selections.

    ``m`` and ``v`` are float32 vectors of length ``dim``, allocated on first use;
    ``count`` is the number of selections folded in so far (Adam's ``t - 1``).
    """

    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    m: torch.Tensor | None = None
    v: torch.Tensor | None = None
    count: int = 0

    @property
    def dim(self) -> int | None:
        """Length of the state vectors, or None before the first use."""
        return None if self.m is None else self.m.numel()

    def ensure(self, dim: int, device: torch.device | str) -> None:
        """Allocate zero state of length ``dim`` on ``device``, or move the existing state there."""
        if self.m is None or self.v is None:
            self.m = torch.zeros(dim, dtype=torch.float32, device=device)
            self.v = torch.zeros(dim, dtype=torch.float32, device=device)
            return
        if self.m.numel() != dim:
            raise ValueError(f"normalizer state has dim {self.m.numel()}, sketch has dim {dim}")
        self.m = self.m.to(device)
        self.v = self.v.to(device)

    def moments(self, g: torch.Tensor, cols: Columns) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample moments ``m_n, v_n`` ([n, c]) of gradients ``g`` at coordinates ``cols``.

        Before any state is allocated the prior moments are zero.
        """
        g = g.float()
        if self.m is None or self.v is None:
            m = v = torch.zeros_like(g[:1])
        else:
            if isinstance(cols, torch.Tensor):
                cols = cols.to(self.m.device)
            m = self.m[cols].to(g.device)
            v = self.v[cols].to(g.device)
        m_n = self.beta1 * m + (1 - self.beta1) * g
        v_n = self.beta2 * v + (1 - self.beta2) * g.square()
        return m_n, v_n

    def features(self, g: torch.Tensor, cols: Columns) -> torch.Tensor:
        """Bias-corrected normalised features ``u = m_hat / (sqrt(v_hat) + eps)``, shape of ``g``."""
        m_n, v_n = self.moments(g, cols)
        t = self.count + 1
        m_hat = m_n / (1 - self.beta1**t)
        v_hat = v_n / (1 - self.beta2**t)
        return m_hat / (v_hat.sqrt() + self.eps)

    def update(self, sketch: Sketch, rows: torch.Tensor, block: int = 65536) -> None:
        """Fold a selection in: ``m, v`` become the means of the selected rows' ``m_n, v_n``.

        Reads ``sketch`` one column block at a time, so the ``[L, D]`` matrix never exists.
        """
        if rows.numel() == 0:
            raise ValueError("update needs at least one selected row")
        if block < 1:
            raise ValueError(f"block must be >= 1, got {block}")
        for cols, g in sketch.blocks(block):
            self.ensure(sketch.dim, g.device)
            m_n, v_n = self.moments(g[rows.to(g.device)], cols)
            # Blocks are disjoint, so writing block by block never feeds a later block.
            self.m[cols] = m_n.mean(dim=0)
            self.v[cols] = v_n.mean(dim=0)
        self.count += 1

    def state_dict(self) -> dict[str, Any]:
        """A copy of the state: ``m``, ``v`` (CPU tensors or None) and ``count``."""
        return {"m": _cpu_copy(self.m), "v": _cpu_copy(self.v), "count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a ``state_dict()``; refuses state whose dim differs from the allocated one."""
        m, v, count = state["m"], state["v"], int(state["count"])
        if (m is None) != (v is None):
            raise ValueError("normalizer state must hold both m and v, or neither")
        if m is not None and m.shape != v.shape:
            raise ValueError(f"normalizer m has shape {tuple(m.shape)}, v {tuple(v.shape)}")
        if m is not None and self.m is not None and m.numel() != self.m.numel():
            raise ValueError(f"normalizer state has dim {m.numel()}, expected {self.m.numel()}")
        if count < 0:
            raise ValueError(f"normalizer count must be >= 0, got {count}")
        device = self.m.device if self.m is not None else "cpu"
        if m is None:
            self.m = self.v = None
        else:
            self.m = m.detach().reshape(-1).to(device=device, dtype=torch.float32).clone()
            self.v = v.detach().reshape(-1).to(device=device, dtype=torch.float32).clone()
        self.count = count

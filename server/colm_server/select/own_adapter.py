"""The scorer's own LoRA, trained by the selector on the coresets it selects.

A scorer that cannot take the trainer's pushed adapter (a smaller model of the same tokenizer), or
one that should not (an early-exit proxy whose head signal is adapted to its own exit), carries its
own LoRA: after each selection the selector takes one AdamW step on the chosen samples with their
weights, on the scorer's own loss. The step goes through the same `LayerSplit` the sketches use,
so an early exit trains exactly the layers it scores with, and the lm_head is backpropagated by
hand a chunk of positions at a time (memory: one chunk of logits, as in the sketch).
"""

from __future__ import annotations

import torch
from torch import nn

from colm_server.model.load import decoder_layers
from colm_server.model.split import LayerSplit
from colm_server.select.batch import TokenBatch

MAX_GRAD_NORM = 1.0  # as the trainer clips


class OwnAdapter:
    """One weighted AdamW step per coreset on the LoRA matrices of the layers the scorer runs."""

    def __init__(self, model: nn.Module, *, lr: float, scorer_layers: int = 0, chunk: int = 8,
                 chunk_tokens: int = 1024):
        """``scorer_layers``: the early exit the scorer uses (0: the whole model); ``chunk``:
        samples per forward/backward, as the sketch's ``sketch_chunk``."""
        depth = len(decoder_layers(model))
        exit_after = min(scorer_layers, depth) or None
        kept = exit_after or depth
        self.split = LayerSplit(model, kept, chunk_tokens=chunk_tokens, exit_after=exit_after)
        kept = {id(p) for layer in self.split.layers for n, p in layer.named_parameters() if "lora_" in n}
        self.params = {n: p for n, p in model.named_parameters() if id(p) in kept}  # model-level names
        if not self.params:
            raise ValueError("scorer_adapter 'own': the scorer has no LoRA matrices in the layers it runs")
        self.chunk = chunk
        self.optimizer = torch.optim.AdamW(list(self.params.values()), lr=lr, weight_decay=0.0)
        self.steps = 0

    def step(self, batch: TokenBatch, weights: torch.Tensor) -> float:
        """One step on the weighted mean of the samples' mean response-token losses; that loss."""
        if len(batch) == 0:
            return 0.0
        try:
            loss = self.backward(batch, weights)
            torch.nn.utils.clip_grad_norm_(list(self.params.values()), MAX_GRAD_NORM)
            self.optimizer.step()
        finally:
            self.optimizer.zero_grad(set_to_none=True)
            self.freeze()
        self.steps += 1
        return loss

    def backward(self, batch: TokenBatch, weights: torch.Tensor) -> float:
        """Leave the gradient of the weighted mean loss in the LoRA matrices' ``.grad``; that loss.

        The matrices require grad afterwards: `step` freezes them again (`freeze`)."""
        w = weights.double().cpu()
        w = (w / w.sum()).float()
        for p in self.params.values():
            p.requires_grad_(True)
        loss = 0.0
        for start in range(0, len(batch), self.chunk):
            rows = list(range(start, min(start + self.chunk, len(batch))))
            loss += self._backward(batch.subset(rows), w[rows])
        return loss

    def freeze(self) -> None:
        """No gradient into the LoRA matrices: the sketches take their own, none may pile up here."""
        for p in self.params.values():
            p.requires_grad_(False)

    def _backward(self, batch: TokenBatch, weights: torch.Tensor) -> float:
        """Accumulate d(sum_n w_n loss_n)/d(LoRA) for one chunk of samples; its weighted loss."""
        split = self.split
        cache = split.prefix(batch.input_ids, batch.attention_mask, batch.labels)
        with torch.enable_grad():
            h = split.top_hidden(cache)
            losses, grad = split.losses_and_head_grad(h, cache)
            w = weights.to(grad.device)
            h.backward((grad.float() * w[cache.rows][:, None]).to(h.dtype))  # weighted in fp32
        return float((losses.float() * w).sum())

    def state_dict(self) -> dict:
        """The LoRA tensors, the optimiser's state and the step count: what resuming needs."""
        return {"lora": {n: p.detach().cpu().clone() for n, p in self.params.items()},
                "optimizer": self.optimizer.state_dict(), "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        lora = state["lora"]
        if set(lora) != set(self.params):
            raise ValueError("the saved scorer adapter has other LoRA matrices than this scorer: "
                             f"{len(lora)} saved, {len(self.params)} here")
        with torch.no_grad():
            for name, p in self.params.items():
                if tuple(lora[name].shape) != tuple(p.shape):
                    raise ValueError(f"saved scorer adapter: {name} has shape {list(lora[name].shape)}, "
                                     f"this scorer's {list(p.shape)}")
                p.copy_(lora[name])
        self.optimizer.load_state_dict(state["optimizer"])
        self.steps = int(state["steps"])


"""Run a decoder once up to its top layers, then re-run only those layers cheaply.

Scoring a large batch needs many passes of the last layer(s) with perturbed or
differentiated weights. `LayerSplit.prefix` runs the model once, in inference mode, up
to the input of the top `n` decoder layers and captures exactly what those layers are
called with (hidden states, mask, position embeddings, ...) through a forward pre-hook,
so the same code serves every Hugging Face decoder-only architecture.
`LayerSplit.losses` re-runs the top layers, the final norm and the lm_head, the last
only at response-token positions and in chunks: an ``N x T x vocab`` logits tensor is
never held. With ``exit_after=k`` the split sees only the first ``k`` layers (an early-exit
proxy of the model): the forward stops there and the norm and head read layer ``k``'s output.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from colm_server.model.load import decoder_layers

_NORM_NAMES = ("norm", "final_layernorm", "final_layer_norm", "ln_f", "norm_f")


class _StopForward(Exception):
    """Raised by the capture hook: nothing above the split point needs to run."""


def _inner_model(model: nn.Module) -> nn.Module:
    """The causal LM under a peft wrapper, if any."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def final_norm(model: nn.Module) -> nn.Module:
    """The norm applied after the last decoder layer."""
    lm = _inner_model(model)
    decoder = lm.get_decoder() if hasattr(lm, "get_decoder") else lm.base_model
    for name in _NORM_NAMES:
        module = getattr(decoder, name, None)
        if isinstance(module, nn.Module):
            return module
    raise ValueError(f"{type(lm).__name__}: no final norm found (looked for {_NORM_NAMES})")


def output_head(model: nn.Module) -> nn.Linear:
    """The lm_head projecting final hidden states to vocabulary logits."""
    head = _inner_model(model).get_output_embeddings()
    if not isinstance(head, nn.Linear):
        raise ValueError(f"expected a linear lm_head, found {type(head).__name__}")
    return head


def _clone(value: Any) -> Any:
    """Copy inference-mode tensors (recursively) so autograd may use them later."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, (tuple, list)):
        return type(value)(_clone(v) for v in value)
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    return value


def _to(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` on ``device``; a copy from the host does not wait for the device's queue
    (safe from pageable memory too: it is staged before the call returns)."""
    return tensor.to(device, non_blocking=tensor.device.type == "cpu")


def scored_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(rows, positions, targets, counts)`` of the positions whose logits predict a response
    token, computed where ``labels`` lie: on the host for a collated batch, so that the
    data-dependent ``nonzero`` waits on no device. ``counts`` is float ``[N]``, summed over the
    mask rather than by ``bincount`` (which on a device reads its maximum back to the host)."""
    scored = labels[:, 1:] != -100
    rows, positions = scored.nonzero(as_tuple=True)
    return rows, positions, labels[rows, positions + 1], scored.sum(dim=1).float()


@dataclass
class PrefixCache:
    """What the top layers need to be re-run, plus where the loss is taken."""

    hidden: torch.Tensor  # [N, T, H] input of the first top layer
    layer_kwargs: dict[str, Any]  # keyword arguments the top layers are called with
    rows: torch.Tensor  # [M] sample of each scored position
    positions: torch.Tensor  # [M] position whose logits predict the next (response) token
    targets: torch.Tensor  # [M] the response token predicted there
    token_counts: torch.Tensor  # [N] response tokens per sample (float)

    @property
    def num_samples(self) -> int:
        return self.hidden.shape[0]


class LayerSplit:
    """A decoder split into a frozen prefix (run once) and `num_top_layers` re-run layers."""

    def __init__(self, model: nn.Module, num_top_layers: int = 1, chunk_tokens: int = 1024,
                 exit_after: int | None = None):
        """``exit_after=k``: an early-exit view of ``model``, its first ``k`` decoder layers followed by
        the final norm and the lm_head; the top layers are then the top of those ``k``."""
        layers = decoder_layers(model)
        if exit_after is not None:
            if not 1 <= exit_after <= len(layers):
                raise ValueError(f"exit_after must be in [1, {len(layers)}], got {exit_after}")
            layers = layers[:exit_after]
        if not 1 <= num_top_layers <= len(layers):
            raise ValueError(f"num_top_layers must be in [1, {len(layers)}], got {num_top_layers}")
        self.model = model
        self.layers = list(layers)
        self.top = self.layers[-num_top_layers:]
        self.norm = final_norm(model)
        self.head = output_head(model)
        self.chunk_tokens = chunk_tokens

    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    def prefix(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
    ) -> PrefixCache:
        """Run the model up to the top layers once, under inference mode."""
        captured: dict[str, Any] = {}

        def capture(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if len(args) > 1:
                raise ValueError("decoder layers taking extra positional arguments are unsupported")
            kwargs = dict(kwargs)
            captured["hidden"] = args[0] if args else kwargs.pop("hidden_states")
            captured["kwargs"] = kwargs
            raise _StopForward

        device = self.device
        handle = self.top[0].register_forward_pre_hook(capture, with_kwargs=True)
        try:
            with torch.inference_mode():
                _inner_model(self.model)(
                    input_ids=_to(input_ids, device),
                    attention_mask=_to(attention_mask, device),
                    use_cache=False,
                )
        except _StopForward:
            pass
        finally:
            handle.remove()
        if "hidden" not in captured:
            raise RuntimeError("the top decoder layer was never called: unsupported model")

        rows, positions, targets, counts = scored_positions(labels)
        return PrefixCache(
            hidden=_clone(captured["hidden"]),
            layer_kwargs=_clone(captured["kwargs"]),
            rows=_to(rows, device),
            positions=_to(positions, device),
            targets=_to(targets, device),
            token_counts=_to(counts, device),
        )

    def top_hidden(self, cache: PrefixCache, hidden: torch.Tensor | None = None) -> torch.Tensor:
        """Final-normed hidden states at the scored positions, ``[M, H]``."""
        hidden = cache.hidden if hidden is None else hidden
        for layer in self.top:
            out = layer(hidden, **cache.layer_kwargs)
            hidden = out[0] if isinstance(out, tuple) else out
        return self.norm(hidden[cache.rows, cache.positions])

    def token_losses(self, h: torch.Tensor, cache: PrefixCache) -> torch.Tensor:
        """Cross-entropy of each scored position, ``[M]``, computed in chunks of positions."""
        out = [
            F.cross_entropy(
                self.head(h[i : i + self.chunk_tokens]).float(),
                cache.targets[i : i + self.chunk_tokens],
                reduction="none",
            )
            for i in range(0, h.shape[0], self.chunk_tokens)
        ]
        return torch.cat(out) if out else h.new_zeros(0, dtype=torch.float32)

    def sample_means(self, values: torch.Tensor, cache: PrefixCache) -> torch.Tensor:
        """Per-sample mean over response positions, ``[N]`` (0 where a sample has none)."""
        sums = torch.zeros(cache.num_samples, device=values.device, dtype=values.dtype)
        sums = sums.index_add(0, cache.rows, values)
        return sums / cache.token_counts.clamp(min=1)

    def losses(self, cache: PrefixCache) -> torch.Tensor:
        """Per-sample mean response-token loss from re-running the top layers, ``[N]``."""
        return self.sample_means(self.token_losses(self.top_hidden(cache), cache), cache)

    def losses_and_head_grad(self, h: torch.Tensor, cache: PrefixCache) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample losses and d(sum of losses)/dh, chunk by chunk, without autograd.

        Backpropagating through the lm_head by hand keeps memory at one chunk of logits;
        autograd would keep the logits of every chunk alive until the backward.
        """
        h = h.detach()
        grad = torch.empty_like(h, dtype=torch.float32)
        token_loss = torch.empty(h.shape[0], device=h.device)
        inv_count = 1.0 / cache.token_counts.clamp(min=1)
        weight = self.head.weight
        for i in range(0, h.shape[0], self.chunk_tokens):
            sl = slice(i, i + self.chunk_tokens)
            logits = self.head(h[sl]).float()
            targets = cache.targets[sl]
            logp = torch.log_softmax(logits, dim=-1)
            token_loss[sl] = -logp.gather(1, targets[:, None]).squeeze(1)
            dlogits = logp.exp_()
            dlogits[torch.arange(len(targets), device=h.device), targets] -= 1.0
            dlogits *= inv_count[cache.rows[sl]][:, None]
            grad[sl] = dlogits.to(weight.dtype) @ weight
        return self.sample_means(token_loss, cache), grad.to(h.dtype)


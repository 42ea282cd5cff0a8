"""Hugging Face ``Trainer`` and TRL ``SFTTrainer`` that train on the selector's weighted coresets.

Swap the class and say where the selector is; the rest of a Trainer script stays::

    from colm_client.hf import ColmArguments, ColmTrainer

    trainer = ColmTrainer(model=peft_model, args=TrainingArguments(..., max_steps=1000),
                          colm=ColmArguments(selector="selector:50051", model_source="smollm2"))
    trainer.train()

Each rank's batches come from its ``CoresetStream`` (no dataset, sampler or collator), the loss is
``weighted_loss`` normalised by the step's weight over all ranks, rank 0 pushes the adapter every
``push_every`` steps, and ``train(resume_from_checkpoint=...)`` rejoins the stream at the checkpoint's
step without reading the skipped batches again. ``ColmSFTTrainer`` (TRL, imported on first use) is
the same on ``trl.SFTTrainer``. Evaluation is the Trainer's own. Every rank appends each step's ids,
sources, weights and loss to ``<output_dir>/ledger-rank<r>.jsonl``, as ``colm-train`` does.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset
from transformers import Trainer, TrainerCallback

from colm_client.accumulate import backward_micro_batches
from colm_client.channel import read_token
from colm_client.loss import weighted_loss
from colm_client.stream import CoresetBatch, CoresetStream
from colm_client.sync import AdapterSync
from colm_wire import contract

__all__ = ["ColmArguments", "ColmTrainer"]  # and ColmSFTTrainer, built when first asked for

# Keys of a stream batch beside input_ids/attention_mask. The labels are not under "labels", so the
# Trainer neither counts tokens for a loss of its own nor hands them to the model.
LABELS, WEIGHTS, TOTAL = "colm_labels", "colm_weights", "colm_step_weight_sum"
META = "colm_meta"  # step, ids, sources: for the ledger, never reaches the model


@dataclass
class ColmArguments:
    """Where the selector is and what the trainer must agree on with it.

    ``model_source`` and ``num_layers`` are the selector's ``model.source`` (written the same way:
    ``tiny:llama``, ``smollm2``, a folder) and ``model.num_layers``; with the PEFT model's LoRA settings
    they are sent when a rank joins, and a selector scoring another model refuses it, naming the key.
    ``token_file`` and ``tls_ca`` default to ``$COLM_AUTH_TOKEN_FILE`` and ``$COLM_TLS_CA``.
    ``push_every``: rank 0 pushes the adapter every N steps (0: never). ``micro_batch``: forward and
    backward each step's batch in micro-batches of at most M rows, with the gradient of the whole step.
    """

    selector: str
    model_source: str
    num_layers: int | None = None
    job_id: str = "default"
    token_file: str | None = None
    tls_ca: str | None = None
    push_every: int = 0
    micro_batch: int | None = None
    reconnect_timeout: float = 300.0

    def __post_init__(self) -> None:
        if self.push_every < 0:
            raise ValueError(f"ColmArguments.push_every must be >= 0 (0: never), got {self.push_every}")
        if self.micro_batch is not None and self.micro_batch < 1:
            raise ValueError(f"ColmArguments.micro_batch must be >= 1 or None, got {self.micro_batch}")


def refusals(args: Any, colm: ColmArguments) -> list[str]:
    """What in ``args`` (TrainingArguments, SFTConfig) coreset training cannot honour, naming each setting."""
    found = []
    if args is None or args.max_steps is None or args.max_steps <= 0:
        got = None if args is None else args.max_steps
        found.append(f"args.max_steps must be > 0, got {got}: the selector's stream has no length, so the "
                     "number of optimizer steps must be given")
        if args is None:
            return found
    if args.gradient_accumulation_steps != 1:
        found.append(f"args.gradient_accumulation_steps must be 1, got {args.gradient_accumulation_steps}: "
                     "one optimizer step is one selector step; to save memory pass "
                     "ColmArguments(micro_batch=M), which accumulates the step's batch in micro-batches")
    if args.dataloader_num_workers:
        found.append(f"args.dataloader_num_workers must be 0, got {args.dataloader_num_workers}: the batches "
                     "come from the selector's stream, read in order by the training process")
    if args.label_smoothing_factor:
        found.append(f"args.label_smoothing_factor must be 0, got {args.label_smoothing_factor}: the "
                     "selector's weights are for the plain weighted cross-entropy")
    for name in ("packing", "padding_free"):
        if getattr(args, name, False):
            found.append(f"args.{name} must be False: the selector sends padded batches, "
                         "one weight per row")
    if colm.micro_batch is not None and (args.fp16 or args.deepspeed):
        setting = "args.fp16" if args.fp16 else "args.deepspeed"
        found.append(f"{setting} cannot go with ColmArguments.micro_batch: micro-batches run their "
                     "own backward")
    return found


class _CoresetSteps(IterableDataset):
    """The trainer's rank's stream as batches for the Trainer, from the step its state is at.

    The step is read when iteration starts, so a run resumed from a checkpoint rejoins the selector at
    the checkpoint's step and skips nothing by reading; past ``args.max_steps`` it yields nothing.
    """

    def __init__(self, trainer: ColmTrainerMixin):
        self.trainer = trainer
        self.stream: CoresetStream | None = None

    def __iter__(self) -> Iterator[dict[str, Any]]:
        start = self.trainer.state.global_step
        remaining = self.trainer.args.max_steps - start
        if remaining <= 0:
            return iter(())
        self.close()
        self.stream = self.trainer.open_stream(start)
        return self._batches(self.stream, remaining)

    @staticmethod
    def _batches(stream: CoresetStream, n: int) -> Iterator[dict[str, Any]]:
        try:
            for i, batch in enumerate(stream):
                yield as_inputs(batch)
                if i + 1 == n:
                    return
        finally:
            stream.close()

    def close(self) -> None:
        if self.stream is not None:
            self.stream.close()
            self.stream = None


def as_inputs(batch: CoresetBatch) -> dict[str, Any]:
    """A coreset batch as the Trainer's inputs: the model's tensors, the loss's, and the ledger's facts."""
    if batch.input_ids is None:
        raise ValueError(f"step {batch.step} came without tokens: the stream must carry payloads")
    return {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, LABELS: batch.labels,
            WEIGHTS: batch.weights, TOTAL: batch.step_weight_sum,
            META: {"step": batch.step, "ids": batch.ids, "sources": batch.sources}}


class AdapterPushCallback(TrainerCallback):
    """Rank 0 pushes its adapter every ``every`` steps, so the selector scores with the trained model."""

    def __init__(self, colm: ColmArguments, token: str | None):
        self.colm, self.token = colm, token
        self.sync: AdapterSync | None = None

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if args.process_index != 0:
            return
        if self.sync is None:
            self.sync = AdapterSync(self.colm.selector, model, self.colm.push_every, self.colm.job_id,
                                    rank=0, token=self.token, tls_ca=self.colm.tls_ca)
        self.sync.maybe_push(state.global_step - 1)  # the selector's step just trained

    def on_train_end(self, args, state, control, **kwargs):
        self.close()

    def close(self) -> None:
        if self.sync is not None:
            self.sync.close()
            self.sync = None


class ColmTrainerMixin:
    """What ``ColmTrainer`` and ``ColmSFTTrainer`` add to their Trainer: the stream, the loss, the push."""

    # The loss is the whole step's (gradient accumulation is refused): the Trainer must not divide it.
    loss_is_scaled_for_ga = True

    def __init__(self, model=None, args=None, *, colm: ColmArguments, **kwargs):
        problems = refusals(args, colm)
        if kwargs.get("train_dataset") is not None:
            problems.append("train_dataset must be None: the selector's stream is the training data")
        if kwargs.get("compute_loss_func") is not None:
            problems.append("compute_loss_func must be None: the loss is the coreset's weighted loss")
        if problems:
            raise ValueError(f"{type(self).__name__}: " + "; ".join(problems))
        self.colm = colm
        self._token = read_token(colm.token_file) if colm.token_file else None  # None: from the environment
        self._steps = _CoresetSteps(self)
        self._push = AdapterPushCallback(colm, self._token) if colm.push_every else None
        self._ledger = None
        kwargs["train_dataset"] = self._stand_in_dataset()
        super().__init__(model=model, args=args, **kwargs)
        self.train_dataset = None
        if not hasattr(self.model, "peft_config"):
            raise ValueError(f"{type(self).__name__}: model must be a PEFT (LoRA) model, the adapter the "
                             f"selector scores with; got {type(self.model).__name__}")
        if self._push is not None:
            self.add_callback(self._push)

    def _stand_in_dataset(self):
        """The train_dataset the parent's __init__ is given (the stream replaces it)."""
        return None

    def open_stream(self, start_step: int) -> CoresetStream:
        """This rank's stream from ``start_step``; the join carries the model settings the selector checks."""
        expected = contract.settings(self.colm.model_source, self.colm.num_layers, self.model)
        return CoresetStream(self.colm.selector, self.colm.job_id, rank=self.args.process_index,
                             world_size=self.args.world_size, start_step=start_step, token=self._token,
                             tls_ca=self.colm.tls_ca, expected=expected,
                             reconnect_timeout=self.colm.reconnect_timeout)

    def get_train_dataloader(self) -> DataLoader:
        """The stream, already batched and already this rank's: not prepared (re-split) by accelerate."""
        return DataLoader(self._steps, batch_size=None, num_workers=0)

    def get_resumed_dataloader(self, dataloader: DataLoader, num_batches: int) -> DataLoader:
        """The stream starts at the resumed step by itself: no batch is read to be skipped."""
        return dataloader

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The coreset's weighted loss on stream batches; the parent's loss on others (evaluation)."""
        if WEIGHTS not in inputs:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        loss = weighted_loss(outputs.logits, inputs[LABELS], inputs[WEIGHTS], total_weight=inputs[TOTAL],
                             world_size=self.accelerator.num_processes)
        return (loss, outputs) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        """One selector step: the parent's step (or micro-batches), then the step's ledger entry."""
        meta = inputs.pop(META, None)
        if meta is not None and self.colm.micro_batch is not None:
            loss = self._micro_batch_step(model, inputs)
        else:
            loss = super().training_step(model, inputs, num_items_in_batch)
        if meta is not None:
            self._log_step(meta, inputs[WEIGHTS], loss)
        return loss

    def _micro_batch_step(self, model, inputs) -> torch.Tensor:
        """Forward and backward in micro-batches; DDP all-reduces once, on the last."""
        model.train()
        batch = self._prepare_inputs(inputs)
        return backward_micro_batches(
            model, batch["input_ids"], batch["attention_mask"], batch[LABELS], batch[WEIGHTS],
            micro_batch=self.colm.micro_batch, total_weight=batch[TOTAL],
            world_size=self.accelerator.num_processes)

    def _log_step(self, meta: dict, weights: torch.Tensor, loss: torch.Tensor) -> None:
        if self._ledger is None:
            out = Path(self.args.output_dir)
            out.mkdir(parents=True, exist_ok=True)
            self._ledger = open(out / f"ledger-rank{self.args.process_index}.jsonl", "a")
        self._ledger.write(json.dumps({**meta, "weights": weights.tolist(), "loss": loss.item()}) + "\n")
        self._ledger.flush()

    def train(self, *args, **kwargs):
        """The parent's train; the stream, the push channel and the ledger are closed however it ends."""
        try:
            return super().train(*args, **kwargs)
        finally:
            self._steps.close()
            if self._push is not None:
                self._push.close()
            if self._ledger is not None:
                self._ledger.close()
                self._ledger = None


class ColmTrainer(ColmTrainerMixin, Trainer):
    """``transformers.Trainer`` on the selector's coresets: give ``colm=ColmArguments(...)``, no dataset."""


def _sft_trainer_class() -> type:
    """``ColmSFTTrainer``, built on first use so that TRL is imported only by those who use it."""
    from datasets import Dataset
    from trl import SFTTrainer

    class ColmSFTTrainer(ColmTrainerMixin, SFTTrainer):
        """``trl.SFTTrainer`` on the selector's coresets: give ``colm=ColmArguments(...)``, no dataset."""

        def _stand_in_dataset(self):
            # SFTTrainer requires a train_dataset; one already tokenised row is neither tokenised nor read.
            return Dataset.from_dict({"input_ids": [[0]]})

    ColmSFTTrainer.__module__, ColmSFTTrainer.__qualname__ = __name__, "ColmSFTTrainer"
    return ColmSFTTrainer


def __getattr__(name: str) -> Any:
    if name == "ColmSFTTrainer":
        cls = globals()[name] = _sft_trainer_class()
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

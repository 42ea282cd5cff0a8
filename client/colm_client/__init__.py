"""Trainer-side helpers for colm-stream: the coreset stream, adapter sync, the loss and its accumulation.

``colm_client.hf`` (extra ``hf``) has ``ColmTrainer`` and ``ColmSFTTrainer``, Hugging Face's Trainer and
TRL's SFTTrainer on the selector's coresets; it is not imported here, so this package needs neither.
"""

from colm_client.accumulate import backward_micro_batches
from colm_client.channel import open_channel
from colm_client.loss import per_sample_loss, weighted_loss
from colm_client.stream import CoresetBatch, CoresetStream, CoresetStreamError
from colm_client.sync import AdapterSync

__all__ = ["AdapterSync", "CoresetBatch", "CoresetStream", "CoresetStreamError", "backward_micro_batches",
           "open_channel", "per_sample_loss", "weighted_loss"]

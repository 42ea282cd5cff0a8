"""Trainer-side helpers for colm-stream."""

from colm_client.loss import per_sample_loss, weighted_loss

__all__ = ["per_sample_loss", "weighted_loss"]

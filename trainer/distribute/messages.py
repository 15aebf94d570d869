"""Pieces of the DistributionError messages that several modules share: a TensorFlow
error's first line, the hint naming CUDA_VISIBLE_DEVICES."""

import os


def _gpu_hint() -> str:
  visible = os.environ.get("CUDA_VISIBLE_DEVICES")
  return f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else ""


def _first_line(error: Exception) -> str:
  text = getattr(error, "message", None) or str(error)
  return text.strip().splitlines()[0] if text.strip() else type(error).__name__

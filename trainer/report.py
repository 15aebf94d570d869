"""The run's report at its end: metrics.json's content (the final test metrics, the
history, how the run went, and what --mode=export exports by default)."""

from absl import logging
import numpy as np

from trainer import metrics, run_dir, run_files
from trainer.actions import EpochEvaluation, RunClock
from trainer.training import Training


def final_metrics(training: Training, epochs: EpochEvaluation, clock: RunClock, step: int,
                  start_step: int, final: dict) -> dict:
  """metrics.json: the final test metrics (EpochEvaluation.final_test), the history and
  how the run went; logs the classes confused most and writes the best test accuracy."""
  state, plan, config = training.state, training.plan, epochs.config
  history, class_names = epochs.history, epochs.splits.class_names
  images, seconds = float(state.timed_images.numpy()), float(state.timed_seconds.numpy())
  result = {
      **{f"test_{k}": v for k, v in final.items()},
      "best_test_accuracy": max([h.get("test_accuracy", -1.0) for h in history]
                                + [final["accuracy"]]),
      "epochs": round(step / plan.steps_per_epoch, 4),
      "steps": step,
      "global_batch_size": config.global_batch_size,
      "wall_seconds": clock.seconds(),
      "images_per_second": images / seconds if seconds else None,
      "resumed_from_step": start_step,
      "replicas": plan.replicas,
      "precision": training.hardware.precision,
      "jit_compile": training.hardware.jit_compile,
      "recipe": config.recipe,
      "model": state.model.name,
      "trainable_parameters": int(sum(v.numpy().size for v in state.model.trainable_variables)),
      "history": history,
  }
  if config.validation_split:
    result["best_validation_accuracy"] = epochs.best_accuracy
  result.update(_export_default(epochs, step))
  result["most_confused"] = metrics.most_confused(np.array(final["confusion_matrix"]),
                                                  class_names)
  logging.info("classes confused most (true -> predicted: test examples): %s",
               ", ".join(f"{t} -> {p}: {n}" for t, p, n in result["most_confused"])
               or "none")
  epochs.summaries.best_test_accuracy(step, result["best_test_accuracy"])
  return result


def _export_default(epochs: EpochEvaluation, step: int) -> dict:
  """metrics.json's record of what --mode=export exports by default, and why."""
  which, _ = run_dir.export_default(epochs.config.validation_split)
  accuracy = f"{epochs.splits.evaluation_name}_accuracy"
  # best/ holds the first epoch that reached the best accuracy (end_epoch saves on >).
  best_step = next((h["step"] for h in epochs.history if h[accuracy] == epochs.best_accuracy),
                   None)
  if which == "best" and best_step is not None:
    return {"export_checkpoint": f"{run_files.BEST_SUBDIR}/ckpt-{best_step}",
            "export_checkpoint_chosen_by": "best_validation_accuracy"}
  return {"export_checkpoint": f"{run_files.CHECKPOINT_SUBDIR}/ckpt-{step}",
          "export_checkpoint_chosen_by": "final"}

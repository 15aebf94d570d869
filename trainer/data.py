"""The run's data: the splits a Config asks for, loaded into memory, with the test split in a
fixed shuffled order and the optional validation hold-out."""

import dataclasses

import numpy as np

from input_pipeline import sources
from trainer import run_files
from trainer.config import Config
from trainer.errors import ConfigError, DataError


@dataclasses.dataclass(frozen=True)
class Splits:
  """train: what the run trains on; evaluation: what every epoch is evaluated on (the test
  split, or the validation hold-out); test: the test split."""
  train: sources.Split
  evaluation: sources.Split
  test: sources.Split
  evaluation_name: str  # run_files.TEST_EVENTS or VALIDATION_EVENTS

  @property
  def class_names(self) -> tuple[str, ...]:
    return self.train.class_names


def load(config: Config) -> Splits:
  """Loads the splits of the config's data source.

  Raises:
    DataError: when the data is missing or unusable.
    ConfigError: when --validation_split does not fit the training split.
  """
  try:
    train, test = sources.load_splits(config.data_source, config.data_dir, config.seed,
                                      config.synthetic_examples)
  except sources.DataError as e:
    raise DataError(str(e)) from None
  # A folder lists the test split class by class: a capped --eval_steps would see one
  # class. One fixed shuffle makes any prefix a fair sample (a full pass is unaffected).
  order = np.random.default_rng(0).permutation(test.num_examples)
  test = sources.Split(test.images[order], test.labels[order], test.class_names)
  name = run_files.eval_split_name(config.validation_split)
  if config.validation_split:
    train, validation = split_validation(train, config.validation_split, config.seed)
    return Splits(train, validation, test, name)
  return Splits(train, test, test, name)


def split_validation(train: sources.Split, size: int, seed: int
                     ) -> tuple[sources.Split, sources.Split]:
  """Holds out `size` training examples (a seeded random choice) for validation.

  Returns:
    (the remaining training examples, the held-out examples).
  """
  if not 0 < size < train.num_examples:
    raise ConfigError(f"--validation_split={size} must be between 1 and the "
                      f"{train.num_examples - 1} training examples")
  order = np.random.default_rng(seed).permutation(train.num_examples)
  keep, held = np.sort(order[size:]), np.sort(order[:size])
  return (sources.Split(train.images[keep], train.labels[keep], train.class_names),
          sources.Split(train.images[held], train.labels[held], train.class_names))

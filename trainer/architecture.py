"""One depth table drives every ResNet: resolves a depth and its overrides into an
Architecture. Pure Python, so the config can validate settings without loading Keras.
"""

import dataclasses
import numbers
from collections.abc import Sequence

BASIC = "basic"
BOTTLENECK = "bottleneck"
BOTTLENECK_EXPANSION = 4

# depth -> (block type, blocks per stage); He et al. (2015) Table 1.
IMAGENET_DEPTHS = {
    18: (BASIC, (2, 2, 2, 2)),
    34: (BASIC, (3, 4, 6, 3)),
    50: (BOTTLENECK, (3, 4, 6, 3)),
    101: (BOTTLENECK, (3, 4, 23, 3)),
    152: (BOTTLENECK, (3, 8, 36, 3)),
}
IMAGENET_WIDTHS = (64, 128, 256, 512)
# He et al. (2015) Sec. 4.2: 6n+2 layers, three stages of n basic blocks.
CIFAR_WIDTHS = (16, 32, 64)
CIFAR_EXAMPLE_DEPTHS = (20, 32, 44, 56, 110, 1202)

STEMS = ("cifar", "imagenet")
# "A": parameter-free shortcut (strided identity, zero-padded channels);
# "B": 1x1 projection where the shape changes, identity elsewhere.
SHORTCUTS = ("A", "B")

@dataclasses.dataclass(frozen=True)
class Architecture:
  """Everything that decides the layers of one network."""
  depth: int
  family: str                   # "imagenet" (Table 1 depths) or "cifar" (6n+2)
  block: str                    # BASIC or BOTTLENECK
  stage_sizes: tuple[int, ...]  # blocks per stage
  stage_widths: tuple[int, ...]  # filters of each stage (bottleneck: before expansion)
  stem: str
  shortcut: str
  plain: bool

  @property
  def name(self) -> str:
    """The model's name: "resnet20", "plain56", ..."""
    return f"{'plain' if self.plain else 'resnet'}{self.depth}"

  @property
  def weighted_layers(self) -> int:
    """Convolutions plus the classifier on the main path: He et al.'s depth.

    Equals `depth` unless stage_sizes overrides the table. Projection shortcuts are not
    counted, as in the paper.
    """
    per_block = 2 if self.block == BASIC else 3
    return 1 + per_block * sum(self.stage_sizes) + 1


def supported_depths_message() -> str:
  """The supported depths, for error messages and help texts."""
  return (f"supported depths: {', '.join(map(str, IMAGENET_DEPTHS))} (ImageNet-style, "
          f"He et al. Table 1; 50 and 152 are also 6n+2 but mean the ImageNet-style "
          f"networks) or any other 6n+2 >= 8 such as "
          f"{', '.join(map(str, CIFAR_EXAMPLE_DEPTHS))} (CIFAR family, Sec. 4.2)")


def is_supported_depth(depth: int) -> bool:
  """Whether `architecture(depth)` knows the depth."""
  if not _is_int(depth):
    return False
  return depth in IMAGENET_DEPTHS or (depth >= 8 and (depth - 2) % 6 == 0)


def architecture(depth: int, *, plain: bool = False, stem: str = "cifar",
                 shortcut: str | None = None,
                 stage_sizes: Sequence[int] | None = None,
                 stage_widths: Sequence[int] | None = None) -> Architecture:
  """Resolves a depth (and optional overrides) into an Architecture.

  The ImageNet-style depths win where both families could claim a depth: 50 and 152
  are also 6n+2, but `architecture(50)` is the bottleneck ResNet-50 of Table 1.

  Args:
    depth: 18, 34, 50, 101, 152, or any other 6n+2 >= 8.
    plain: no shortcut additions at all.
    stem: "cifar" (3x3 stride 1) or "imagenet" (7x7 stride 2 + 3x3 max-pool stride 2).
    shortcut: "A" or "B"; None picks "A" for the CIFAR family, "B" otherwise.
    stage_sizes: overrides the table's blocks per stage (the depth then only chooses
      the family and block type).
    stage_widths: overrides the table's widths; as many as stages.
  Returns:
    the architecture.
  Raises:
    ValueError: for an unsupported depth or inconsistent overrides.
  """
  if not is_supported_depth(depth):
    raise ValueError(f"unsupported depth {depth!r}; {supported_depths_message()}")
  depth = int(depth)
  if depth in IMAGENET_DEPTHS:
    family = "imagenet"
    block, sizes = IMAGENET_DEPTHS[depth]
    widths = IMAGENET_WIDTHS
  else:
    family, block = "cifar", BASIC
    sizes = ((depth - 2) // 6,) * 3
    widths = CIFAR_WIDTHS
  # `is not None`: an empty override is a mistake to report, not a request for defaults.
  sizes = _positive_ints("stage_sizes", stage_sizes) if stage_sizes is not None else sizes
  widths = (_positive_ints("stage_widths", stage_widths) if stage_widths is not None
            else widths)
  if len(sizes) != len(widths):
    raise ValueError(f"stage_sizes {_listed(sizes)} and stage_widths {_listed(widths)} must "
                     "have the same number of stages")
  if stem not in STEMS:
    raise ValueError(f"unknown stem {stem!r}; use one of {STEMS}")
  shortcut = shortcut or ("A" if family == "cifar" else "B")
  if shortcut not in SHORTCUTS:
    raise ValueError(f"unknown shortcut {shortcut!r}; use one of {SHORTCUTS}")
  if shortcut == "A" and not plain and any(b < a for a, b in zip(widths, widths[1:])):
    # Zero-padding can add channels but never remove them.
    raise ValueError(f"shortcut A needs non-decreasing stage_widths, got {_listed(widths)}; use "
                     "shortcut B (projection)")
  return Architecture(depth, family, block, sizes, widths, stem, shortcut, plain)


def _is_int(value) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _positive_ints(name: str, values: Sequence[int]) -> tuple[int, ...]:
  values = tuple(values)
  if not values:
    raise ValueError(f"{name} must not be empty")
  if any(not _is_int(v) or v < 1 for v in values):
    raise ValueError(f"{name} must be positive integers, got {_listed(values)}")
  return tuple(int(v) for v in values)


def _listed(values) -> str:
  """Stage sizes or widths as the flags take them: 16,32,64."""
  return ",".join(str(v) for v in values)

"""ResNets (He et al. 2015) and their plain twins for 32x32 images, from one depth table.

Two families: the ImageNet-style depths of Table 1 (18-152) and the CIFAR family of
Section 4.2 (depth 6n+2). Layer names are fixed (`stage2_block1_conv1`), so checkpoints
stay loadable as the code changes.
"""

import dataclasses
import numbers
import sys
from collections.abc import Sequence

import keras
from keras import layers, ops

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

# What `build_model` does with uint8 images when no statistics are given: scale to [0, 1].
DEFAULT_INPUT_MEAN = (0.0, 0.0, 0.0)
DEFAULT_INPUT_STD = (255.0, 255.0, 255.0)


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
    raise ValueError(f"stage_sizes {sizes} and stage_widths {widths} must have the same "
                     "number of stages")
  if stem not in STEMS:
    raise ValueError(f"unknown stem {stem!r}; use one of {STEMS}")
  shortcut = shortcut or ("A" if family == "cifar" else "B")
  if shortcut not in SHORTCUTS:
    raise ValueError(f"unknown shortcut {shortcut!r}; use one of {SHORTCUTS}")
  if shortcut == "A" and not plain and any(b < a for a, b in zip(widths, widths[1:])):
    # Zero-padding can add channels but never remove them.
    raise ValueError(f"shortcut A needs non-decreasing stage_widths, got {widths}; use "
                     "shortcut B (projection)")
  return Architecture(depth, family, block, sizes, widths, stem, shortcut, plain)


def _is_int(value) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _positive_ints(name: str, values: Sequence[int]) -> tuple[int, ...]:
  values = tuple(values)
  if not values:
    raise ValueError(f"{name} must not be empty")
  if any(not _is_int(v) or v < 1 for v in values):
    raise ValueError(f"{name} must be positive integers, got {values}")
  return tuple(int(v) for v in values)


@keras.saving.register_keras_serializable(package="resnet_cifar")
class ChannelZeroPad(layers.Layer):
  """Zero-pads the channel axis to `channels` (He et al.'s option A shortcut).

  The input's channels land at offset (channels - C) // 2; the zeros go either side.
  """

  def __init__(self, channels: int, **kwargs):
    super().__init__(**kwargs)
    self.channels = channels

  def build(self, input_shape):
    if input_shape[-1] > self.channels:
      raise ValueError(f"{self.name}: cannot zero-pad {input_shape[-1]} channels down to "
                       f"{self.channels}")

  def call(self, x):
    extra = self.channels - x.shape[-1]
    return ops.pad(x, [[0, 0], [0, 0], [0, 0], [extra // 2, extra - extra // 2]])

  def compute_output_shape(self, input_shape):
    return (*input_shape[:-1], self.channels)

  def get_config(self):
    return {**super().get_config(), "channels": self.channels}


@dataclasses.dataclass(frozen=True)
class _LayerOptions:
  bn_momentum: float
  sync_batch_norm: bool
  zero_init_residual: bool


def _conv(x, filters: int, kernel: int, strides: int, name: str):
  padding = "same"
  if strides > 1 and kernel > 1:
    # "same" pads only bottom/right when the input size is even, which centres output
    # pixel i on input pixel 2i+1, while a strided shortcut (option A's subsampling, B's
    # 1x1 projection) takes pixel 2i. Symmetric padding, as in the paper's Caffe/Torch
    # models, keeps both summands of the residual addition on the same pixels.
    x = layers.ZeroPadding2D(kernel // 2, name=f"{name}_pad")(x)
    padding = "valid"
  return layers.Conv2D(filters, kernel, strides=strides, padding=padding, use_bias=False,
                       kernel_initializer="he_normal", name=name)(x)


def _bn(x, opts: _LayerOptions, name: str, zero_gamma: bool = False):
  return layers.BatchNormalization(
      momentum=opts.bn_momentum, epsilon=1e-5, synchronized=opts.sync_batch_norm,
      gamma_initializer="zeros" if zero_gamma else "ones", name=name)(x)


def _zero_gamma(arch: Architecture, opts: _LayerOptions) -> bool:
  # Zero gammas make a residual block start as the identity; in a plain net they would
  # zero every block's output and with it the whole signal, so plain nets ignore it.
  return opts.zero_init_residual and not arch.plain


def _shortcut(x, out_channels: int, strides: int, arch: Architecture,
              opts: _LayerOptions, name: str):
  if strides == 1 and x.shape[-1] == out_channels:
    return x
  if arch.shortcut == "B":
    x = _conv(x, out_channels, 1, strides, f"{name}_proj_conv")
    return _bn(x, opts, f"{name}_proj_bn")
  if strides > 1:
    # A 1x1 average-pool with stride 2 is exactly x[:, ::2, ::2, :] (and, unlike max-pool,
    # has a deterministic XLA gradient).
    x = layers.AveragePooling2D(1, strides, name=f"{name}_shortcut_subsample")(x)
  return ChannelZeroPad(out_channels, name=f"{name}_shortcut_pad")(x)


def basic_block(x, filters: int, strides: int, arch: Architecture, opts: _LayerOptions,
                name: str):
  """Two 3x3 convolutions; the shortcut is added unless the network is plain."""
  y = _conv(x, filters, 3, strides, f"{name}_conv1")
  y = layers.ReLU(name=f"{name}_relu1")(_bn(y, opts, f"{name}_bn1"))
  y = _conv(y, filters, 3, 1, f"{name}_conv2")
  y = _bn(y, opts, f"{name}_bn2", zero_gamma=_zero_gamma(arch, opts))
  if not arch.plain:
    y = layers.Add(name=f"{name}_add")(
        [_shortcut(x, filters, strides, arch, opts, name), y])
  return layers.ReLU(name=f"{name}_out")(y)


def bottleneck_block(x, filters: int, strides: int, arch: Architecture,
                     opts: _LayerOptions, name: str):
  """1x1 reduce, 3x3 (strided), 1x1 expand by 4; shortcut added unless plain."""
  out_channels = filters * BOTTLENECK_EXPANSION
  y = _conv(x, filters, 1, 1, f"{name}_conv1")
  y = layers.ReLU(name=f"{name}_relu1")(_bn(y, opts, f"{name}_bn1"))
  y = _conv(y, filters, 3, strides, f"{name}_conv2")
  y = layers.ReLU(name=f"{name}_relu2")(_bn(y, opts, f"{name}_bn2"))
  y = _conv(y, out_channels, 1, 1, f"{name}_conv3")
  y = _bn(y, opts, f"{name}_bn3", zero_gamma=_zero_gamma(arch, opts))
  if not arch.plain:
    y = layers.Add(name=f"{name}_add")(
        [_shortcut(x, out_channels, strides, arch, opts, name), y])
  return layers.ReLU(name=f"{name}_out")(y)


_BLOCKS = {BASIC: basic_block, BOTTLENECK: bottleneck_block}


def build_model(arch: Architecture, *, num_classes: int = 10,
                input_mean: Sequence[float] | None = None,
                input_std: Sequence[float] | None = None,
                bn_momentum: float = 0.9, sync_batch_norm: bool = False,
                zero_init_residual: bool = False) -> keras.Model:
  """Builds the network an Architecture describes.

  The model takes uint8 images; its first layer, `normalize`, computes
  (image - input_mean) / input_std per channel in float32 (under every dtype policy),
  so the input pipeline can stay uint8.

  Args:
    arch: from `architecture()`.
    num_classes: size of the classifier.
    input_mean: per-channel mean (0-255 scale); None (with input_std None) scales the
      images to [0, 1] instead.
    input_std: per-channel standard deviation (0-255 scale).
    bn_momentum: batch-norm moving-average momentum.
    sync_batch_norm: batch statistics over all replicas.
    zero_init_residual: start the last batch-norm gamma of each residual branch at 0
      (residual nets only: plain nets have no residual branch).
  Returns:
    a functional Keras model from uint8 images [B, 32, 32, 3] to float32 logits
    [B, num_classes].
  Raises:
    ValueError: for inconsistent input statistics.
  """
  if (input_mean is None) != (input_std is None):
    raise ValueError("give both input_mean and input_std, or neither")
  mean = tuple(DEFAULT_INPUT_MEAN if input_mean is None else input_mean)
  std = tuple(DEFAULT_INPUT_STD if input_std is None else input_std)
  if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
    raise ValueError(f"input_mean and input_std need 3 values each, std > 0; got {mean} "
                     f"and {std}")
  # Keras maps a functional graph recursively, one Python frame per layer on the longest
  # path; ResNet-1202 (about 4,200 layers) would exceed Python's default limit of 1,000.
  needed = 2_000 + 12 * sum(arch.stage_sizes)
  if sys.getrecursionlimit() < needed:
    sys.setrecursionlimit(needed)

  opts = _LayerOptions(bn_momentum, sync_batch_norm, zero_init_residual)
  inputs = keras.Input((32, 32, 3), dtype="uint8", name="image")
  # float32 whatever the policy: pixel statistics lose precision in bfloat16, and the
  # stem convolution casts its input to the compute dtype anyway.
  x = layers.Normalization(mean=list(mean), variance=[s * s for s in std],
                           dtype="float32", name="normalize")(inputs)
  if arch.stem == "imagenet":
    x = _conv(x, arch.stage_widths[0], 7, 2, "stem_conv")
    x = layers.ReLU(name="stem_relu")(_bn(x, opts, "stem_bn"))
    # Zero padding is neutral for a max-pool after a ReLU (inputs >= 0); symmetric like
    # the strided convolutions.
    x = layers.ZeroPadding2D(1, name="stem_pool_pad")(x)
    x = layers.MaxPooling2D(3, 2, name="stem_pool")(x)
  else:
    x = _conv(x, arch.stage_widths[0], 3, 1, "stem_conv")
    x = layers.ReLU(name="stem_relu")(_bn(x, opts, "stem_bn"))
  block_fn = _BLOCKS[arch.block]
  for stage, (num_blocks, width) in enumerate(zip(arch.stage_sizes, arch.stage_widths)):
    for block in range(num_blocks):
      strides = 2 if stage > 0 and block == 0 else 1
      x = block_fn(x, width, strides, arch, opts, f"stage{stage + 1}_block{block + 1}")
  x = layers.GlobalAveragePooling2D(name="head_pool")(x)
  # float32 classifier: logits stay float32 under mixed-precision policies.
  logits = layers.Dense(num_classes, kernel_initializer="he_normal", dtype="float32",
                        name="head_dense")(x)
  name = f"{'plain' if arch.plain else 'resnet'}{arch.depth}"
  return keras.Model(inputs, logits, name=name)


def build_resnet(depth: int, *, plain: bool = False, num_classes: int = 10,
                 stem: str = "cifar", shortcut: str | None = None,
                 stage_sizes: Sequence[int] | None = None,
                 stage_widths: Sequence[int] | None = None,
                 **model_kwargs) -> keras.Model:
  """Builds ResNet-`depth` (or its plain twin); see `architecture` and `build_model`.

  Returns:
    the Keras model.
  """
  arch = architecture(depth, plain=plain, stem=stem, shortcut=shortcut,
                      stage_sizes=stage_sizes, stage_widths=stage_widths)
  return build_model(arch, num_classes=num_classes, **model_kwargs)

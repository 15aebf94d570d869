"""ResNets (He et al. 2015) and their plain twins for 32x32 images, built from the depth
table in trainer/architecture.py (re-exported here). Layer names are fixed
(`stage2_block1_conv1`), so checkpoints stay loadable as the code changes.
"""

import dataclasses
import sys
from collections.abc import Sequence

import keras
from keras import layers, ops

from trainer import batch_norm

# Re-exported: callers (scripts/, tests) resolve architectures through this module too.
from trainer.architecture import (  # noqa: F401
    BASIC, BOTTLENECK, BOTTLENECK_EXPANSION, CIFAR_EXAMPLE_DEPTHS, CIFAR_WIDTHS,
    IMAGENET_DEPTHS, IMAGENET_WIDTHS, SHORTCUTS, STEMS, Architecture, architecture,
    is_supported_depth, supported_depths_message)

# What `build_model` does with uint8 images when no statistics are given: scale to [0, 1].
DEFAULT_INPUT_MEAN = (0.0, 0.0, 0.0)
DEFAULT_INPUT_STD = (255.0, 255.0, 255.0)


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
  portable: bool = False
  fused_batch_norm: bool = True


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
  # The fused kernel where it can run: Keras's own layer computes moments and
  # normalisation as separate ops, about a quarter of a narrow CIFAR ResNet's step on
  # CPU. Same variables either way. Synchronized statistics are ours too (two passes,
  # batch_norm.py); exports take stock layers only (the same inference maths).
  stock = opts.portable or not opts.fused_batch_norm
  layer = layers.BatchNormalization if stock else batch_norm.FusedBatchNormalization
  return layer(momentum=opts.bn_momentum, epsilon=1e-5, synchronized=opts.sync_batch_norm,
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
  if opts.portable:
    return _stock_channel_zero_pad(x, out_channels, f"{name}_shortcut_pad")
  return ChannelZeroPad(out_channels, name=f"{name}_shortcut_pad")(x)


def _stock_channel_zero_pad(x, channels: int, name: str):
  """ChannelZeroPad from stock Keras layers only, so a saved model loads without this
  module. Pure data movement (no arithmetic): its output equals ChannelZeroPad's exactly.
  """
  height, width, in_channels = x.shape[1:]
  if in_channels > channels:
    raise ValueError(f"{name}: cannot zero-pad {in_channels} channels down to {channels}")
  extra = channels - in_channels
  # Channels as the third spatial axis of a one-channel volume: ZeroPadding3D pads it.
  x = layers.Reshape((height, width, in_channels, 1), name=f"{name}_to_volume")(x)
  x = layers.ZeroPadding3D(((0, 0), (0, 0), (extra // 2, extra - extra // 2)),
                           name=name)(x)
  return layers.Reshape((height, width, channels), name=f"{name}_to_image")(x)


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
                zero_init_residual: bool = False, portable: bool = False,
                fused_batch_norm: bool = True) -> keras.Model:
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
    portable: stock Keras layers only (option A's channel padding from stock layers
      instead of ChannelZeroPad, keras.layers.BatchNormalization instead of
      FusedBatchNormalization), so a saved .keras file loads where this project cannot
      be imported (exports). The same variable paths, so checkpoints restore into
      either build, and the same outputs (within float rounding: the two batch norms
      round differently); training uses the default build.
    fused_batch_norm: batch norm through TensorFlow's fused kernel
      (batch_norm.FusedBatchNormalization); False: keras.layers.BatchNormalization
      everywhere, the layer of earlier versions (for benchmarks; same variables and
      results within float rounding).
  Returns:
    a functional Keras model from uint8 images [B, 32, 32, 3] to float32 logits
    [B, num_classes].
  Raises:
    ValueError: for inconsistent input statistics.
  """
  mean, std = _input_statistics(input_mean, input_std)
  _ensure_recursion_limit(arch)

  opts = _LayerOptions(bn_momentum, sync_batch_norm, zero_init_residual, portable,
                       fused_batch_norm)
  inputs = keras.Input((32, 32, 3), dtype="uint8", name="image")
  # float32 whatever the policy: pixel statistics lose precision in bfloat16, and the
  # stem convolution casts its input to the compute dtype anyway.
  x = layers.Normalization(mean=list(mean), variance=[s * s for s in std],
                           dtype="float32", name="normalize")(inputs)
  x = _stem(x, arch, opts)
  block_fn = _BLOCKS[arch.block]
  for stage, (num_blocks, width) in enumerate(zip(arch.stage_sizes, arch.stage_widths)):
    for block in range(num_blocks):
      strides = 2 if stage > 0 and block == 0 else 1
      x = block_fn(x, width, strides, arch, opts, f"stage{stage + 1}_block{block + 1}")
  x = layers.GlobalAveragePooling2D(name="head_pool")(x)
  # float32 classifier: logits stay float32 under mixed-precision policies.
  logits = layers.Dense(num_classes, kernel_initializer="he_normal", dtype="float32",
                        name="head_dense")(x)
  return keras.Model(inputs, logits, name=arch.name)


def _ensure_recursion_limit(arch: Architecture) -> None:
  # Keras maps a functional graph recursively, one Python frame per layer on the longest
  # path; ResNet-1202 (about 4,200 layers) would exceed Python's default limit of 1,000.
  needed = 2_000 + 12 * sum(arch.stage_sizes)
  if sys.getrecursionlimit() < needed:
    sys.setrecursionlimit(needed)


def _input_statistics(input_mean: Sequence[float] | None, input_std: Sequence[float] | None
                      ) -> tuple[tuple[float, ...], tuple[float, ...]]:
  if (input_mean is None) != (input_std is None):
    raise ValueError("give both input_mean and input_std, or neither")
  mean = tuple(DEFAULT_INPUT_MEAN if input_mean is None else input_mean)
  std = tuple(DEFAULT_INPUT_STD if input_std is None else input_std)
  if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
    raise ValueError(f"input_mean and input_std need 3 values each, std > 0; got {mean} "
                     f"and {std}")
  return mean, std


def _stem(x, arch: Architecture, opts: _LayerOptions):
  """cifar: 3x3 stride-1 convolution; imagenet: 7x7 stride 2 and a 3x3 stride-2 max-pool."""
  if arch.stem == "imagenet":
    x = _conv(x, arch.stage_widths[0], 7, 2, "stem_conv")
    x = layers.ReLU(name="stem_relu")(_bn(x, opts, "stem_bn"))
    # Zero padding is neutral for a max-pool after a ReLU (inputs >= 0); symmetric like
    # the strided convolutions.
    x = layers.ZeroPadding2D(1, name="stem_pool_pad")(x)
    x = layers.MaxPooling2D(3, 2, name="stem_pool")(x)
    return x
  x = _conv(x, arch.stage_widths[0], 3, 1, "stem_conv")
  return layers.ReLU(name="stem_relu")(_bn(x, opts, "stem_bn"))


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

"""Forward-pass FLOPs of a functional Keras model, counted from its layers' shapes.

FLOPs = 2 x multiply-accumulates (MACs) of the convolution and dense layers, per example;
biases, batch norm, activations, additions and pooling are not counted (the usual
convention of He et al. 2015's FLOP figures, which are in fact multiply-adds).
"""

import math

import keras
from keras import layers

_CONVS = (layers.Conv1D, layers.Conv2D, layers.Conv3D, layers.DepthwiseConv1D,
          layers.DepthwiseConv2D)
_SEPARABLE_CONVS = (layers.SeparableConv1D, layers.SeparableConv2D)


def layer_macs(layer: keras.layers.Layer) -> int:
  """Multiply-accumulates of one call of `layer` on one example.

  Args:
    layer: a layer of a built functional model, called once (its `output` is known).
  Returns:
    the count; 0 for layers without a kernel (batch norm, pooling, activations, ...).
  Raises:
    ValueError: for a kernel-bearing layer type this module cannot count, or an output
      shape that is not static.
  """
  if isinstance(layer, keras.Model):
    return forward_macs(layer)
  if isinstance(layer, _CONVS + _SEPARABLE_CONVS):
    # Every output position of a convolution applies the whole kernel once (grouped and
    # depthwise kernels already hold only the input channels each output sees).
    positions = _static_size(layer, _spatial(layer.output.shape, layer.data_format))
    if isinstance(layer, _SEPARABLE_CONVS):
      return positions * (math.prod(layer.depthwise_kernel.shape)
                          + math.prod(layer.pointwise_kernel.shape))
    return positions * math.prod(layer.kernel.shape)
  if isinstance(layer, layers.Dense):
    # Dense applies its kernel to every position of the axes before the last one.
    return _static_size(layer, layer.output.shape[1:-1]) * math.prod(layer.kernel.shape)
  if any(w.path.endswith("kernel") for w in layer.weights):
    raise ValueError(f"cannot count the FLOPs of layer {layer.name!r} "
                     f"({type(layer).__name__}); supported: Conv1D/2D/3D, depthwise and "
                     "separable convolutions, Dense")
  return 0


def forward_macs(model: keras.Model) -> int:
  """Multiply-accumulates of one forward pass of `model` on one example.

  Args:
    model: a built functional (or Sequential) model with static input shape, each layer
      called once; nested models are counted recursively.
  Returns:
    the sum of `layer_macs` over the model's layers.
  """
  return sum(layer_macs(layer) for layer in model.layers)


def forward_flops(model: keras.Model) -> int:
  """Forward-pass FLOPs of `model` per example: 2 x `forward_macs`.

  Args:
    model: as for `forward_macs`.
  Returns:
    the FLOP count.
  """
  return 2 * forward_macs(model)


def _spatial(shape: tuple, data_format: str) -> tuple:
  return shape[1:-1] if data_format == "channels_last" else shape[2:]


def _static_size(layer: keras.layers.Layer, dims: tuple) -> int:
  if any(d is None for d in dims):
    raise ValueError(f"layer {layer.name!r} has a dynamic output shape; FLOPs need a "
                     "model built for a fixed input size")
  return math.prod(dims)

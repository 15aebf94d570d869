"""Pins trainer/resnet.py to He et al. (2015) and published parameter counts; checks the
FLOP counter (scripts/flops.py) and scripts/model_summary.py.
"""

import functools
import json
import math
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from keras import layers

from conftest import skip_unless_cpu_runs
from scripts import flops
from trainer import resnet

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A small bottleneck network (the ResNet-50 block type) that builds and runs fast.
SMALL_BOTTLENECK = dict(stage_sizes=(1, 1, 1, 1), stage_widths=(4, 8, 8, 16))


def _params(weights) -> int:
  return sum(math.prod(w.shape) for w in weights)


@functools.cache
def _model(depth: int, **kwargs) -> keras.Model:
  """float32 models shared by read-only tests (kwargs must be hashable)."""
  return resnet.build_resnet(depth, **kwargs)


def _layers_of(model: keras.Model, cls) -> list:
  return [layer for layer in model.layers if isinstance(layer, cls)]


def _images(n: int = 2) -> np.ndarray:
  return np.random.default_rng(0).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


@pytest.fixture(params=["float32", "mixed_float16", "mixed_bfloat16"])
def policy(request):
  keras.mixed_precision.set_global_policy(request.param)
  yield request.param
  keras.mixed_precision.set_global_policy("float32")


# --- Parameter counts --------------------------------------------------------------------

# He et al. (2015) Table 6: CIFAR-10, option A shortcuts, "#params" as printed there.
HE_TABLE6_PARAMS = {20: "0.27M", 32: "0.46M", 44: "0.66M", 56: "0.85M", 110: "1.7M"}


@pytest.mark.parametrize("depth,printed", HE_TABLE6_PARAMS.items())
def test_cifar_family_params_match_he_table6(depth, printed):
  decimals = len(printed[:-1].split(".")[1])
  params = _params(_model(depth).trainable_weights)
  assert f"{params / 1e6:.{decimals}f}M" == printed


# kuangliu/pytorch-cifar's ResNet18()/ResNet50(), the widely used CIFAR adaptation of
# Table 1's networks: 3x3 stride-1 stem, no max-pool, projection (option B) shortcuts,
# 10 classes. Exact trainable counts.
@pytest.mark.parametrize("depth,expected", [(18, 11_173_962), (50, 23_520_842)])
def test_imagenet_style_cifar_stem_params_exact(depth, expected):
  assert _params(_model(depth).trainable_weights) == expected


def test_imagenet_stem_resnet50_body_equals_keras_applications():
  """What "equal" means here: keras.applications' ResNet50 gives every convolution a
  bias (redundant before batch norm; ours have none), so its trainable count minus its
  convolution biases (summed from its own variables) equals our trainable count without
  the classifier; the batch-norm moving statistics and the multiset of convolution
  kernel shapes are identical too. (It strides the first 1x1 convolution of a
  downsampling bottleneck, we stride the 3x3 as the issue asks: same shapes.)
  """
  reference = keras.applications.ResNet50(include_top=False, weights=None)
  ours = _model(50, stem="imagenet")
  reference_convs = _layers_of(reference, layers.Conv2D)
  conv_biases = _params(conv.bias for conv in reference_convs)
  assert conv_biases == 26_560  # 53 convolutions; documents the difference.
  body = [w for w in ours.trainable_weights if not w.path.startswith("head_dense/")]
  assert _params(body) == _params(reference.trainable_weights) - conv_biases
  assert _params(ours.non_trainable_weights) == _params(reference.non_trainable_weights)
  assert (sorted(tuple(c.kernel.shape) for c in _layers_of(ours, layers.Conv2D))
          == sorted(tuple(c.kernel.shape) for c in reference_convs))


@pytest.mark.parametrize("depth", [20, 32])
def test_plain_twin_of_option_a_net_has_the_same_params(depth):
  assert (_params(_model(depth, plain=True).trainable_weights)
          == _params(_model(depth).trainable_weights))


def test_plain_twin_of_option_b_net_lacks_exactly_the_projections():
  residual, plain = _model(18), _model(18, plain=True)
  projections = [w for w in residual.trainable_weights if "_proj_" in w.path]
  assert projections
  assert (_params(plain.trainable_weights)
          == _params(residual.trainable_weights) - _params(projections))


def test_custom_stage_layout_hand_counted():
  model = resnet.build_resnet(18, stage_sizes=(1, 2), stage_widths=(8, 16))
  # stem 3*3*3*8 + bn 16; stage 1: 2 x (3*3*8*8 + bn 16); stage 2 block 1: 3*3*8*16 +
  # 3*3*16*16 + 2 bn 32 + projection 8*16 + bn 32; block 2: 2 x (3*3*16*16 + bn 32);
  # classifier 16*10 + 10.
  expected = (216 + 16) + 2 * (576 + 16) + (1152 + 2304 + 64 + 128 + 32) \
      + 2 * (2304 + 32) + 170
  assert _params(model.trainable_weights) == expected == 9_938
  assert model.get_layer("stage2_block2_conv2").kernel.shape == (3, 3, 16, 16)
  assert not any(layer.name.startswith("stage3") for layer in model.layers)
  assert model.output.shape == (None, 10)


# --- Structure -----------------------------------------------------------------------

SMALL_BOTTLENECK_A = dict(shortcut="A", **SMALL_BOTTLENECK)
TWIN_CASES = [(20, {}), (18, {}), (50, SMALL_BOTTLENECK), (50, SMALL_BOTTLENECK_A),
              (20, dict(shortcut="B"))]


@pytest.mark.parametrize("depth,kwargs", TWIN_CASES)
def test_plain_twin_is_the_residual_net_without_shortcuts(depth, kwargs):
  residual = _model(depth, **kwargs)
  plain = _model(depth, plain=True, **kwargs)
  assert not _layers_of(plain, layers.Add)
  assert not _layers_of(plain, resnet.ChannelZeroPad)
  assert not [layer for layer in plain.layers if "_proj" in layer.name
              or "_shortcut" in layer.name]

  def main_path(model):
    return [(c.name, tuple(c.kernel.shape)) for c in _layers_of(model, layers.Conv2D)
            if "_proj" not in c.name]

  assert main_path(plain) == main_path(residual)


@pytest.mark.parametrize("depth,kwargs,projections,zero_pads", [
    (20, {}, 0, 2),                # option A: stages 2 and 3 change shape
    (20, dict(shortcut="B"), 2, 0),
    (18, {}, 3, 0),                # option B: stages 2-4
    (50, {}, 4, 0),                # also stage 1's 64 -> 256 expansion
    (50, SMALL_BOTTLENECK_A, 0, 4),
])
def test_residual_net_has_one_addition_per_block(depth, kwargs, projections, zero_pads):
  model = _model(depth, **kwargs)
  arch = resnet.architecture(depth, **kwargs)
  assert len(_layers_of(model, layers.Add)) == sum(arch.stage_sizes)
  assert len([c for c in _layers_of(model, layers.Conv2D) if "_proj" in c.name]) \
      == projections
  assert len(_layers_of(model, resnet.ChannelZeroPad)) == zero_pads


@pytest.mark.parametrize("depth,kwargs,sizes", [
    (20, {}, (32, 16, 8)),
    (110, {}, (32, 16, 8)),
    (18, {}, (32, 16, 8, 4)),
    (50, {}, (32, 16, 8, 4)),
    (50, dict(stem="imagenet"), (8, 4, 2, 1)),  # 7x7/2 conv and 3x3/2 pool: 32 -> 8
])
def test_stage_output_resolutions(depth, kwargs, sizes):
  model = _model(depth, **kwargs)
  arch = resnet.architecture(depth, **kwargs)
  expansion = resnet.BOTTLENECK_EXPANSION if arch.block == resnet.BOTTLENECK else 1
  assert len(arch.stage_sizes) == len(sizes)
  for stage, (blocks, width, size) in enumerate(
      zip(arch.stage_sizes, arch.stage_widths, sizes), start=1):
    shape = model.get_layer(f"stage{stage}_block{blocks}_out").output.shape
    assert shape == (None, size, size, width * expansion), f"stage {stage}"


def test_layer_names_are_fixed():
  model = _model(20)
  names = {layer.name for layer in model.layers}
  for name in ("normalize", "stem_conv", "stem_bn", "stem_relu", "stage1_block1_conv1",
               "stage1_block1_bn1", "stage1_block1_conv2", "stage1_block1_bn2",
               "stage1_block1_add", "stage1_block1_out", "stage2_block1_conv1",
               "stage2_block1_shortcut_subsample", "stage2_block1_shortcut_pad",
               "stage3_block3_conv2", "stage3_block3_out", "head_pool", "head_dense"):
    assert name in names
  assert model.get_layer("stage2_block1_conv1").kernel.path == "stage2_block1_conv1/kernel"
  assert {"stem_pool", "stage1_block1_proj_conv", "stage2_block1_proj_bn",
          "stage2_block1_conv2_pad", "stage4_block3_conv3", "stage4_block3_bn3"} <= {
              layer.name for layer in _model(50, stem="imagenet").layers}


@pytest.mark.parametrize("depth,kwargs", [(20, {}), (18, {}), (50, SMALL_BOTTLENECK)])
def test_only_conv_and_dense_kernels_end_with_kernel(depth, kwargs):
  """The trainer decays variables whose path ends with "kernel"."""
  model = _model(depth, **kwargs)
  decayed = {v.path for v in model.trainable_weights if v.path.endswith("kernel")}
  kernels = {layer.kernel.path for layer in model.layers
             if isinstance(layer, (layers.Conv2D, layers.Dense))}
  assert decayed == kernels
  others = {v.path.rsplit("/", 1)[1] for v in model.trainable_weights} - {"kernel"}
  assert others == {"gamma", "beta", "bias"}


# --- Input, output and dtypes ----------------------------------------------------------

@pytest.mark.parametrize("depth,kwargs", [(20, {}),
                                          (50, dict(stem="imagenet", **SMALL_BOTTLENECK))])
def test_logits_are_float32_under_every_policy(policy, depth, kwargs):
  skip_unless_cpu_runs(policy)
  model = resnet.build_resnet(depth, **kwargs)
  logits = model(_images(), training=False)
  assert tuple(logits.shape) == (2, 10)
  assert keras.backend.standardize_dtype(logits.dtype) == "float32"
  assert np.all(np.isfinite(keras.ops.convert_to_numpy(logits)))
  assert model.inputs[0].dtype == "uint8"
  compute = {"float32": "float32", "mixed_float16": "float16",
             "mixed_bfloat16": "bfloat16"}[policy]
  assert model.get_layer("stem_conv").compute_dtype == compute  # the policy took effect
  assert model.get_layer("stem_conv").kernel.dtype == "float32"
  assert model.get_layer("normalize").compute_dtype == "float32"


def test_normalize_layer_applies_the_given_statistics():
  model = resnet.build_resnet(8, input_mean=(100.0, 110.0, 120.0),
                              input_std=(50.0, 60.0, 70.0))
  images = _images()
  got = keras.ops.convert_to_numpy(model.get_layer("normalize")(images))
  want = (images.astype(np.float32) - [100.0, 110.0, 120.0]) / [50.0, 60.0, 70.0]
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  # Without statistics the model still takes uint8 images and scales them to [0, 1].
  default = keras.ops.convert_to_numpy(_model(20).get_layer("normalize")(images))
  np.testing.assert_allclose(default, images / 255.0, rtol=1e-6)
  with pytest.raises(ValueError, match="both"):
    resnet.build_resnet(8, input_mean=(0.0, 0.0, 0.0))


# --- Depths and overrides ----------------------------------------------------------------

@pytest.mark.parametrize("depth", [37, 19, 2, 0, -4, 20.0, True, "20"])
def test_unsupported_depth_lists_the_supported_ones(depth):
  with pytest.raises(ValueError, match="supported depths") as error:
    resnet.architecture(depth)
  for supported in (18, 34, 50, 101, 152, 20, 32, 44, 56, 110, 1202):
    assert str(supported) in str(error.value)


def test_depth_table():
  for depth in resnet.IMAGENET_DEPTHS:
    arch = resnet.architecture(depth)
    assert (arch.family, arch.shortcut, arch.stage_widths) == (
        "imagenet", "B", (64, 128, 256, 512))
    assert arch.block == (resnet.BASIC if depth < 50 else resnet.BOTTLENECK)
    assert arch.weighted_layers == depth
  # 50 and 152 are also 6n+2; the ImageNet-style table wins.
  assert resnet.architecture(152).stage_sizes == (3, 8, 36, 3)
  for depth in (8, 14, 20, 32, 44, 56, 110, 1202):
    arch = resnet.architecture(depth)
    n = (depth - 2) // 6
    assert (arch.family, arch.block, arch.shortcut) == ("cifar", resnet.BASIC, "A")
    assert (arch.stage_sizes, arch.stage_widths) == ((n, n, n), (16, 32, 64))
    assert arch.weighted_layers == depth


def test_stage_overrides():
  # The layout the original blog post meant for its "ResNet-34".
  arch = resnet.architecture(34, stage_sizes=[3, 4, 6, 3], stage_widths=[64, 128, 256, 512])
  assert arch == resnet.architecture(34)
  arch = resnet.architecture(50, stage_sizes=(2, 2), stage_widths=(32, 64))
  assert (arch.block, arch.stage_sizes, arch.stage_widths) == (
      resnet.BOTTLENECK, (2, 2), (32, 64))
  assert arch.weighted_layers == 14
  # Option A cannot remove channels, but B and plain nets can.
  assert resnet.architecture(20, stage_widths=(32, 16, 8), shortcut="B")
  assert resnet.architecture(20, stage_widths=(32, 16, 8), plain=True)


@pytest.mark.parametrize("kwargs,message", [
    # Values as the flags take them (1,2), not as Python prints a tuple.
    (dict(stage_sizes=(1, 2)), "stage_sizes 1,2 and stage_widths 16,32,64 must have the same "
     "number of stages"),
    (dict(stage_widths=(16, 32)), "same number of stages"),
    (dict(stage_sizes=(1, 0, 1)), "positive integers, got 1,0,1$"),
    (dict(stage_sizes=(1, -1, 1)), "positive"),
    (dict(stage_widths=(16, 32.5, 64)), "positive integers"),
    (dict(stage_sizes=()), "must not be empty"),
    (dict(stage_widths=(32, 16, 8)), "non-decreasing stage_widths, got 32,16,8;"),
    (dict(stem="tiny"), "unknown stem"),
    (dict(shortcut="C"), "unknown shortcut"),
])
def test_invalid_overrides(kwargs, message):
  with pytest.raises(ValueError, match=message):
    resnet.architecture(20, **kwargs)


def test_zero_init_residual_zeroes_the_last_gamma_of_each_branch():
  for depth, kwargs, last in [(20, {}, "_bn2"), (50, SMALL_BOTTLENECK, "_bn3")]:
    model = resnet.build_resnet(depth, zero_init_residual=True, **kwargs)
    arch = resnet.architecture(depth, **kwargs)
    zeroed = []
    for bn in _layers_of(model, layers.BatchNormalization):
      gamma = keras.ops.convert_to_numpy(bn.gamma)
      if bn.name.startswith("stage") and bn.name.endswith(last):
        zeroed.append(bn.name)
        assert not gamma.any(), bn.name
      else:  # stem, inner and projection batch norms
        assert (gamma == 1).all(), bn.name
    assert len(zeroed) == sum(arch.stage_sizes)
  # Off by default, and a no-op for plain nets (no residual branch: zero gammas would
  # zero the whole signal).
  for model in (_model(20), resnet.build_resnet(20, plain=True, zero_init_residual=True)):
    for bn in _layers_of(model, layers.BatchNormalization):
      assert (keras.ops.convert_to_numpy(bn.gamma) == 1).all(), bn.name


# --- Shortcuts -----------------------------------------------------------------------

def test_option_a_shortcut_is_strided_identity_plus_zero_channels():
  model = _model(20)
  subsample = model.get_layer("stage2_block1_shortcut_subsample")
  pad = model.get_layer("stage2_block1_shortcut_pad")
  # Wiring: previous block's output -> subsample -> pad -> first input of the addition.
  assert subsample.input is model.get_layer("stage1_block3_out").output
  assert pad.input is subsample.output
  assert model.get_layer("stage2_block1_add").input[0] is pad.output
  assert not subsample.weights and not pad.weights
  x = np.random.default_rng(1).normal(size=(2, 32, 32, 16)).astype(np.float32)
  got = keras.ops.convert_to_numpy(pad(subsample(x)))
  want = np.zeros((2, 16, 16, 32), np.float32)
  want[..., 8:24] = x[:, ::2, ::2, :]  # 16 zero channels, 8 either side
  np.testing.assert_array_equal(got, want)


def test_strided_branch_is_aligned_with_the_shortcut():
  """A strided 3x3 convolution whose kernel is a centre tap reproduces the option A
  shortcut exactly: the residual branch and the shortcut see the same pixels."""
  model = resnet.build_resnet(8)  # fresh: the kernel is overwritten
  conv = model.get_layer("stage2_block1_conv1")
  kernel = np.zeros(conv.kernel.shape, np.float32)  # (3, 3, 16, 32)
  for c in range(16):
    kernel[1, 1, c, c + 8] = 1.0
  conv.kernel.assign(kernel)
  x = np.random.default_rng(2).normal(size=(2, 32, 32, 16)).astype(np.float32)
  branch = conv(model.get_layer("stage2_block1_conv1_pad")(x))
  shortcut = model.get_layer("stage2_block1_shortcut_pad")(
      model.get_layer("stage2_block1_shortcut_subsample")(x))
  np.testing.assert_allclose(keras.ops.convert_to_numpy(branch),
                             keras.ops.convert_to_numpy(shortcut), atol=1e-6)


def test_channel_zero_pad_refuses_to_drop_channels():
  with pytest.raises(ValueError, match="cannot zero-pad"):
    resnet.ChannelZeroPad(8)(keras.Input((4, 4, 16)))


def test_keras_file_round_trip(tmp_path):
  model = resnet.build_resnet(8, input_mean=(125.0, 123.0, 114.0),
                              input_std=(63.0, 62.0, 67.0))
  path = str(tmp_path / "resnet8.keras")
  model.save(path)
  loaded = keras.models.load_model(path)
  assert [type(layer) for layer in loaded.layers] == [type(layer) for layer in model.layers]
  assert loaded.get_layer("stage2_block1_shortcut_pad").channels == 32
  images = _images()
  np.testing.assert_allclose(keras.ops.convert_to_numpy(loaded(images, training=False)),
                             keras.ops.convert_to_numpy(model(images, training=False)),
                             rtol=1e-5, atol=1e-5)


# --- FLOPs -----------------------------------------------------------------------------

def test_forward_flops_hand_counted():
  model = keras.Sequential([
      keras.Input((8, 8, 3)),
      layers.Conv2D(4, 3, strides=2, padding="same"),  # 4x4 x 4 x (3*3*3)  = 1728
      layers.DepthwiseConv2D(3),                       # 2x2 x 4 x (3*3)    = 144
      layers.SeparableConv2D(6, 1),                    # 2x2 x (4 + 4*6)    = 112
      layers.Conv2D(4, 1, groups=2),                   # 2x2 x 4 x (6/2)    = 48
      layers.BatchNormalization(),                     # not counted
      layers.GlobalAveragePooling2D(),
      layers.Dense(10),                                # 4 x 10            = 40
  ])
  assert flops.forward_macs(model) == 1728 + 144 + 112 + 48 + 40
  assert flops.forward_flops(model) == 2 * 2072


def test_forward_flops_resnet20():
  # Multiply-accumulates of ResNet-20 by hand (H*W*C_out*k*k*C_in per convolution):
  stem = 32 * 32 * 16 * 27
  stage1 = 6 * 32 * 32 * 16 * 144
  stage2 = 16 * 16 * 32 * 144 + 5 * 16 * 16 * 32 * 288
  stage3 = 8 * 8 * 64 * 288 + 5 * 8 * 8 * 64 * 576
  macs = stem + stage1 + stage2 + stage3 + 64 * 10
  assert flops.forward_flops(_model(20)) == 2 * macs == 81_102_080
  # Option A shortcuts cost no multiply-adds.
  assert flops.forward_flops(_model(20, plain=True)) == 2 * macs


def test_forward_flops_refuses_what_it_cannot_count():
  transpose = keras.Sequential([keras.Input((4, 4, 3)), layers.Conv2DTranspose(2, 3)])
  with pytest.raises(ValueError, match="cannot count"):
    flops.forward_flops(transpose)
  inputs = keras.Input((None, None, 3))
  dynamic = keras.Model(inputs, layers.Conv2D(2, 3)(inputs))
  with pytest.raises(ValueError, match="dynamic"):
    flops.forward_flops(dynamic)


# --- scripts/model_summary.py --------------------------------------------------------

def _summary(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "scripts/model_summary.py", *args], cwd=REPO,
                        capture_output=True, text=True, timeout=300)


@pytest.mark.process
def test_model_summary_prints_json_last():
  result = _summary("--depth=20", "--plain")
  assert result.returncode == 0, result.stderr
  assert "FLOPs = 2 x multiply-accumulates" in result.stdout
  summary = json.loads(result.stdout.strip().splitlines()[-1])
  assert summary["params"] == 269_722
  assert summary["flops"] == 81_102_080
  assert (summary["depth"], summary["plain"], summary["block"]) == (20, True, "basic")
  assert summary["stage_sizes"] == [3, 3, 3]
  assert summary["output_shape"] == [None, 10]
  # TensorFlow's C++ start-up lines (a CUDA "error" among them on a CPU machine) are hidden.
  assert result.stderr == ""


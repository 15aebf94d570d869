"""trainer/batch_norm.py: the fused batch norm computes what keras.layers.BatchNormalization
computes (forward, gradients, moving statistics; float32 and mixed precision, XLA,
MirroredStrategy), restores the old layer's checkpoints, and stays out of exports."""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import REPO, mirrored_on_two_cpus
from trainer import batch_norm, resnet, state

SHAPE = (8, 6, 6, 5)  # NHWC: n = 288 values per channel.
MOMENTUM = 0.9
EPSILON = 1e-5
# Max |fused - keras| relative to the largest |keras| value, per policy: float32 rounding;
# half-precision outputs differ by at most a rounding of the output dtype (both layers
# compute in float32 and round once).
TOLERANCE = {"float32": 1e-5, "mixed_bfloat16": 2e-2, "mixed_float16": 2e-3}
POLICIES = list(TOLERANCE)


@pytest.fixture(params=POLICIES)
def policy(request):
  keras.mixed_precision.set_global_policy(request.param)
  yield request.param
  keras.mixed_precision.set_global_policy("float32")


def _twins(shape=SHAPE, seed: int = 0, **kwargs) -> tuple:
  """keras.layers.BatchNormalization and FusedBatchNormalization with the same weights
  (gamma, beta and moving statistics away from their initial values)."""
  pair = (keras.layers.BatchNormalization(momentum=MOMENTUM, epsilon=EPSILON, **kwargs),
          batch_norm.FusedBatchNormalization(momentum=MOMENTUM, epsilon=EPSILON, **kwargs))
  rng = np.random.default_rng(seed)
  channels = shape[kwargs.get("axis", -1)]
  values = {"gamma": rng.uniform(0.5, 2.0, channels), "beta": rng.normal(0, 1, channels),
            "moving_mean": rng.normal(0, 1, channels),
            "moving_variance": rng.uniform(0.5, 2.0, channels)}
  for layer in pair:
    layer.build(shape)
    for variable in layer.variables:
      if variable.name in values:  # Not renorm's own statistics.
        variable.assign(values[variable.name].astype(np.float32))
  return pair


def _inputs(shape=SHAPE, seed: int = 1) -> tf.Tensor:
  # Mean 3, std 2: the statistics must be subtracted, not assumed 0 and 1.
  return tf.constant(np.random.default_rng(seed).normal(3, 2, shape).astype(np.float32))


def _upstream(shape=SHAPE) -> tf.Tensor:
  # Random: a constant upstream gradient gives dL/dx = 0 in training mode.
  return tf.constant(np.random.default_rng(2).normal(0, 1, shape).astype(np.float32))


def _forward_and_gradients(layer, x, upstream, training: bool, jit: bool) -> list:
  """[y, dL/dx, dL/dgamma, dL/dbeta] as float32 numpy, L = sum(y * upstream)."""

  def step(x):
    with tf.GradientTape() as tape:
      tape.watch(x)
      y = layer(x, training=training)
      loss = tf.reduce_sum(tf.cast(y, tf.float32) * upstream)
    return [y, *tape.gradient(loss, [x, layer.gamma, layer.beta])]

  return [np.asarray(tf.cast(t, tf.float32)) for t in tf.function(step, jit_compile=jit)(x)]


def _assert_close(actual: np.ndarray, expected: np.ndarray, tolerance: float, what: str):
  scale = max(float(np.abs(expected).max()), 1e-6)
  error = float(np.abs(actual - expected).max()) / scale
  assert error <= tolerance, f"{what}: relative error {error:.3g} > {tolerance}"


@pytest.mark.parametrize("jit", [False, True], ids=["graph", "xla"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "inference"])
def test_forward_and_gradients_match_keras(policy, training, jit):
  keras_bn, fused = _twins()
  x = _inputs()
  upstream = _upstream()
  expected = _forward_and_gradients(keras_bn, x, upstream, training, jit)
  actual = _forward_and_gradients(fused, x, upstream, training, jit)
  assert fused(x, training=training).dtype == keras_bn(x, training=training).dtype
  for name, a, e in zip(["y", "dx", "dgamma", "dbeta"], actual, expected):
    _assert_close(a, e, TOLERANCE[policy], f"{policy} {name}")


@pytest.mark.parametrize("jit", [False, True], ids=["graph", "xla"])
def test_moving_statistics_after_steps_match_keras(policy, jit):
  keras_bn, fused = _twins()
  for layer in (keras_bn, fused):
    step = tf.function(lambda x, layer=layer: layer(x, training=True), jit_compile=jit)
    for seed in range(3):
      step(_inputs(seed=seed))
  for name in ("moving_mean", "moving_variance"):
    np.testing.assert_allclose(getattr(fused, name).numpy(), getattr(keras_bn, name).numpy(),
                               rtol=1e-5, atol=1e-6, err_msg=f"{policy} {name}")
  assert fused.moving_mean.dtype == fused.moving_variance.dtype == "float32"


def test_moving_statistics_follow_keras_convention_with_the_biased_variance():
  # Independent of Keras: moving = moving * momentum + batch * (1 - momentum), with the
  # batch's biased variance (divided by n, not n - 1).
  _, fused = _twins()
  before_mean, before_variance = fused.moving_mean.numpy(), fused.moving_variance.numpy()
  x = _inputs()
  fused(x, training=True)
  values = x.numpy().reshape(-1, SHAPE[-1]).astype(np.float64)
  # float32 sums of 288 values against float64: rounding differs by CPU (AVX2, AVX-512) up
  # to ~1e-6; the unbiased variance would differ by 1/287 of the batch term, ~1e-4.
  tolerance = {"rtol": 1e-5, "atol": 1e-6}
  np.testing.assert_allclose(
      fused.moving_mean.numpy(),
      before_mean * MOMENTUM + values.mean(0) * (1 - MOMENTUM), **tolerance)
  np.testing.assert_allclose(
      fused.moving_variance.numpy(),
      before_variance * MOMENTUM + values.var(0, ddof=0) * (1 - MOMENTUM), **tolerance)
  assert not np.allclose(  # The tolerance tells the two conventions apart.
      fused.moving_variance.numpy(),
      before_variance * MOMENTUM + values.var(0, ddof=1) * (1 - MOMENTUM), **tolerance)


def _kernel_input_dtypes(layer) -> list:
  """The input dtype (T) of each FusedBatchNormV3 op a training call of `layer` runs;
  asserts that the statistics, scale and offset (U) are float32."""
  graph = tf.function(lambda x: layer(x, training=True)).get_concrete_function(
      tf.TensorSpec(SHAPE, tf.float32)).graph
  kernels = [op for op in graph.get_operations() if op.type == "FusedBatchNormV3"]
  assert all(op.get_attr("U") == tf.float32 for op in kernels)
  return [op.get_attr("T") for op in kernels]


@pytest.mark.parametrize("policy,dtype", [("mixed_bfloat16", tf.bfloat16),
                                          ("mixed_float16", tf.float16)])
def test_half_inputs_reach_the_fused_kernel_in_their_own_dtype(policy, dtype):
  if not batch_norm._kernel_runs(dtype.name):
    # On CPUs without AVX-512 (or capped below it; see the test below).
    dtype = tf.float32
  keras.mixed_precision.set_global_policy(policy)
  try:
    _, fused = _twins()
    assert _kernel_input_dtypes(fused) == [dtype]
  finally:
    keras.mixed_precision.set_global_policy("float32")


@pytest.mark.process
def test_bfloat16_on_a_cpu_without_avx512_normalises_in_float32():
  # oneDNN's bfloat16 batch norm needs AVX-512 and raises without it, though TensorFlow
  # registers the kernel; ONEDNN_MAX_CPU_ISA=AVX2 makes any x86 CPU one without.
  script = """if True:
    import keras, numpy as np, tensorflow as tf
    from trainer import batch_norm
    print([d for d in ("float32", "float16", "bfloat16") if batch_norm._kernel_runs(d)])
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    layer, x = batch_norm.FusedBatchNormalization(), tf.random.normal([4, 3, 3, 2])
    with tf.GradientTape() as tape:
      tape.watch(x)
      y = layer(x, training=True)
    print(y.dtype.name, bool(np.isfinite(tape.gradient(y, x).numpy()).all()))
    """
  result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                          text=True, timeout=120,
                          env={**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"})
  assert result.returncode == 0, result.stderr[-3000:]
  if "bfloat16" in result.stdout.split("\n")[0]:
    # Seen on an AVX2-only AMD EPYC (2026-12-03): its oneDNN runs bfloat16 batch norm.
    pytest.skip("this CPU runs the bfloat16 kernel even under ONEDNN_MAX_CPU_ISA=AVX2")
  # Whether float16 runs there differs between CPUs (not on a Xeon with AVX512_FP16,
  # 2026-12-05; yes on the Xeon of 2026-11-30): only float32 and bfloat16 are the point.
  kernels, outcome = result.stdout.split("\n")[:2]
  assert "'float32'" in kernels and "bfloat16" not in kernels
  assert outcome == "bfloat16 True"


def test_without_a_half_kernel_it_normalises_in_float32(monkeypatch):
  monkeypatch.setattr(batch_norm, "_kernel_runs", lambda dtype: dtype == "float32")
  keras.mixed_precision.set_global_policy("mixed_float16")
  try:
    keras_bn, fused = _twins()
    x = _inputs()
    upstream = _upstream()
    expected = _forward_and_gradients(keras_bn, x, upstream, True, False)
    actual = _forward_and_gradients(fused, x, upstream, True, False)
    assert fused(x, training=True).dtype == tf.float16
    assert _kernel_input_dtypes(fused) == [tf.float32]
  finally:
    keras.mixed_precision.set_global_policy("float32")
  for name, a, e in zip(["y", "dx", "dgamma", "dbeta"], actual, expected):
    _assert_close(a, e, TOLERANCE["mixed_float16"], name)


@pytest.mark.parametrize("case", ["mask", "rank2", "axis1", "renorm", "float64"])
def test_what_the_kernel_cannot_do_falls_back_to_keras(case):
  shape, kwargs, call_kwargs = SHAPE, {}, {}
  if case == "rank2":
    shape = (16, 5)
  elif case == "axis1":
    kwargs = {"axis": 1}
    shape = (8, 5, 6, 6)
  elif case == "renorm":
    kwargs = {"renorm": True}
  elif case == "float64":
    kwargs = {"dtype": "float64"}
  elif case == "mask":
    call_kwargs = {"mask": tf.constant(np.arange(np.prod(SHAPE[:-1])).reshape(SHAPE[:-1])
                                       % 3 > 0)}
  keras_bn, fused = _twins(shape, **kwargs)
  x = _inputs(shape)
  graph = tf.function(lambda x: fused(x, training=True, **call_kwargs)).get_concrete_function(
      tf.TensorSpec(shape, tf.float32)).graph
  assert "FusedBatchNormV3" not in {op.type for op in graph.get_operations()}
  np.testing.assert_allclose(np.asarray(fused(x, training=True, **call_kwargs)),
                             np.asarray(keras_bn(x, training=True, **call_kwargs)),
                             rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(fused.moving_variance.numpy(),
                             keras_bn.moving_variance.numpy(), rtol=1e-6)


def test_per_replica_statistics_under_mirrored_strategy():
  strategy = mirrored_on_two_cpus()
  with strategy.scope():
    keras_bn, fused = _twins()

  @tf.function
  def train_step(layer):
    def replica_fn():
      replica = tf.distribute.get_replica_context().replica_id_in_sync_group
      # Each replica's batch has its own statistics.
      return layer(_inputs() * (1.0 + tf.cast(replica, tf.float32)), training=True)
    return strategy.run(replica_fn)

  outputs = [strategy.experimental_local_results(train_step(layer))
             for layer in (keras_bn, fused)]
  for expected, actual in zip(*outputs):
    np.testing.assert_allclose(actual.numpy(), expected.numpy(), rtol=1e-5, atol=1e-5)
  for name in ("moving_mean", "moving_variance"):
    expected = [c.numpy() for c in strategy.experimental_local_results(
        getattr(keras_bn, name).value)]
    actual = [c.numpy() for c in strategy.experimental_local_results(
        getattr(fused, name).value)]
    assert not np.allclose(actual[0], actual[1]), name  # Not synchronized.
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-6, err_msg=name)


def _train_step(model: keras.Model, optimizer, images, labels) -> None:
  with tf.GradientTape() as tape:
    loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(
        labels, model(images, training=True), from_logits=True))
  optimizer.apply_gradients(zip(tape.gradient(loss, model.trainable_variables),
                                model.trainable_variables))


def _stock_bn(x, opts, name: str, zero_gamma: bool = False):
  """trainer/resnet.py's `_bn` as it was before the fused layer, verbatim."""
  return keras.layers.BatchNormalization(
      momentum=opts.bn_momentum, epsilon=1e-5, synchronized=opts.sync_batch_norm,
      gamma_initializer="zeros" if zero_gamma else "ones", name=name)(x)


def test_a_checkpoint_of_the_stock_layer_restores_and_resumes(monkeypatch, tmp_path):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
  labels = rng.integers(0, 10, 8)
  with monkeypatch.context() as patch:
    patch.setattr(resnet, "_bn", _stock_bn)
    old = resnet.build_resnet(8)
  assert not any(isinstance(layer, batch_norm.FusedBatchNormalization)
                 for layer in old.layers)
  _train_step(old, keras.optimizers.SGD(0.1), images, labels)  # Statistics move too.
  prefix = tf.train.Checkpoint(model=state.variables_by_path(old.variables)).write(
      str(tmp_path / "ckpt"))

  new = resnet.build_resnet(8)
  assert any(isinstance(layer, batch_norm.FusedBatchNormalization) for layer in new.layers)
  assert sorted(v.path for v in new.variables) == sorted(v.path for v in old.variables)
  assert {"stem_bn/moving_variance", "stage1_block1_bn1/gamma"} <= {
      v.path for v in new.variables}
  tf.train.Checkpoint(model=state.variables_by_path(new.variables)).read(
      prefix).assert_consumed()
  np.testing.assert_allclose(new(images, training=False).numpy(),
                             old(images, training=False).numpy(), rtol=1e-5, atol=1e-5)
  # Resuming: one more step of each gives the same weights and statistics.
  for model in (old, new):
    _train_step(model, keras.optimizers.SGD(0.1), images, labels)
  old_values = {v.path: v.numpy() for v in old.variables}
  for variable in new.variables:
    # One SGD step at 0.1 from gradients that the fused kernel rounds differently.
    np.testing.assert_allclose(variable.numpy(), old_values[variable.path], rtol=1e-4,
                               atol=2e-4, err_msg=variable.path)


def test_builds_use_the_fused_layer_except_portable():
  def batch_norms(model):
    return [type(layer) for layer in model.layers
            if isinstance(layer, keras.layers.BatchNormalization)]

  for kwargs in ({}, {"sync_batch_norm": True}):
    assert set(batch_norms(resnet.build_resnet(8, **kwargs))) == {
        batch_norm.FusedBatchNormalization}, kwargs
  portable = resnet.build_resnet(8, portable=True)
  assert set(batch_norms(portable)) == {keras.layers.BatchNormalization}
  assert {type(layer).__module__.split(".")[0] for layer in portable.layers} == {"keras"}


def test_synchronized_statistics_on_one_device_are_the_batch_statistics():
  """Two passes over the global batch: on one device, what the unsynchronized layer
  computes (forward, gradients, moving statistics), to float rounding."""
  keras_bn, fused = _twins(SHAPE, synchronized=True)
  plain = batch_norm.FusedBatchNormalization(momentum=0.9, epsilon=1e-5)
  plain.build(SHAPE)
  plain.set_weights(fused.get_weights())
  x = _inputs(SHAPE) * 3.0 + 50.0  # A large mean: E[x^2] - E[x]^2 would cancel.
  outputs = []
  for layer in (fused, plain):
    with tf.GradientTape() as tape:
      tape.watch(x)
      y = layer(x, training=True)
      loss = tf.reduce_sum(y * tf.sin(y))
    outputs.append((y, *tape.gradient(loss, [x, layer.gamma, layer.beta])))
  for name, a, e in zip(["y", "dx", "dgamma", "dbeta"], *outputs):
    _assert_close(a, e, TOLERANCE["float32"], name)
  for name in ("moving_mean", "moving_variance"):
    np.testing.assert_allclose(getattr(fused, name).numpy(), getattr(plain, name).numpy(),
                               rtol=1e-5, atol=1e-6, err_msg=name)


def test_a_model_with_the_fused_layer_saves_and_loads(tmp_path):
  model = resnet.build_resnet(8)
  path = tmp_path / "model.keras"
  model.save(path)
  loaded = keras.saving.load_model(path)
  layer = loaded.get_layer("stage1_block1_bn1")
  assert isinstance(layer, batch_norm.FusedBatchNormalization)
  assert layer.get_config() == model.get_layer("stage1_block1_bn1").get_config()
  images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
  np.testing.assert_allclose(loaded(images).numpy(), model(images).numpy(), rtol=1e-6)

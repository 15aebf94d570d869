"""scripts/benchmark.py --compare: every contender asked for is timed in the same rounds
and reported, with paired ratios; bad flags are refused. (Its figures are not checked
here: speed is measured by running the script, see BENCHMARKS.md.)"""

import json
import subprocess
import sys

import pytest

from conftest import REPO, skip_unless_cpu_runs

# Every test runs a script of scripts/ (and through it the trainer) as a process.
pytestmark = pytest.mark.process


def _benchmark(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "scripts/benchmark.py", *args], cwd=REPO,
                        capture_output=True, text=True, timeout=300)


def test_compare_times_the_trainer_at_each_precision_asked_for():
  skip_unless_cpu_runs("mixed_float16")
  result = _benchmark("--compare", "--depth=8", "--global_batch_size=8", "--window_steps=1",
                      "--windows=2", "--warmup_windows=0", "--threads=1",
                      "--compare_precisions=mixed_float16", "--matmul_size=128")
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(result.stdout.strip().splitlines()[-1])
  contenders = report["contenders"]
  assert set(contenders) == {"trainer", "trainer_mixed_float16", "ours_fused_bn",
                             "ours_keras_bn", "minimal_keras"}
  assert all(len(c["window_images_per_second"]) == 2 for c in contenders.values())
  assert report["precision"] == "float32"
  assert contenders["trainer"]["compute_dtype"] == "float32"
  assert contenders["trainer_mixed_float16"]["compute_dtype"] == "float16"
  assert report["trainer_mixed_float16_vs_trainer"] > 0
  assert "trainer step, mixed_float16" in result.stdout
  # Each contender's FLOP rate against the matmul peak of its own compute type.
  peaks = report["matmul_peak_tflops"]
  assert set(peaks) == {"float32", "float16"} and all(p > 0 for p in peaks.values())
  for name, figures in contenders.items():
    dtype = "float16" if name == "trainer_mixed_float16" else "float32"
    expected = (figures["images_per_second"] * report["training_flops_per_image"] / 1e12
                / peaks[dtype])
    assert abs(figures["share_of_peak"] - expected) <= 1e-9 * expected, name


@pytest.mark.parametrize("args, message", [
    (["--compare", "--compare_precisions=float8"],
     "--compare_precisions: 'float8' is not float32, mixed_float16 or mixed_bfloat16"),
    (["--compare_precisions=mixed_bfloat16"], "--compare_precisions needs --compare"),
    (["--depth=7"], "--depth=7: unsupported depth 7"),
    (["--compare", "--torch_python=/nonexistent/python"],
     "--torch_python=/nonexistent/python is not an executable file"),
], ids=["unknown-precision", "precisions-without-compare", "depth", "torch-python"])
def test_benchmark_refuses_what_cannot_run_with_error_and_exit_2(args, message):
  # Were a traceback (depth, torch python) or absl's usage text and exit 1.
  result = _benchmark(*args)
  assert result.returncode == 2, result.stderr[-3000:]
  assert result.stderr.startswith(f"error: {message}"), result.stderr[-3000:]


def _compare_checkouts(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "scripts/compare_checkouts.py", *args], cwd=REPO,
                        capture_output=True, text=True, timeout=300)


def test_compare_checkouts_reports_both_checkouts_per_depth_and_strategy(tmp_path):
  # This checkout against itself: both sides run and are reported, paired.
  result = _compare_checkouts(f"--other={REPO}", "--depths=8", "--strategies=default",
                              "--rounds=1", "--windows=1", "--window_steps=2",
                              "--benchmark_args=--global_batch_size=8")
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(result.stdout.strip().splitlines()[-1])
  figures = report["resnet8/default"]
  assert figures["this"] > 0 and figures["other"] > 0
  assert figures["this_vs_other"] == figures["this"] / figures["other"]
  assert figures["paired_ratios"] == [figures["this"] / figures["other"]]
  assert figures["paired_ratio_median"] == figures["paired_ratios"][0]


def test_compare_checkouts_refuses_what_is_not_a_checkout(tmp_path):
  for args in ([f"--other={tmp_path}"], [f"--other={REPO}", "--strategies=tpu"]):
    result = _compare_checkouts(*args)
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "Traceback" not in result.stderr


def _compare_settings(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "scripts/compare_settings.py", *args], cwd=REPO,
                        capture_output=True, text=True, timeout=300)


def test_compare_settings_times_each_setting_in_its_own_process_in_the_same_rounds():
  result = _compare_settings("--depth=8", "--global_batch_size=8", "--window_steps=1",
                             "--windows=2", "--warmup_windows=0",
                             "--setting=intra=1 inter=1",
                             "--setting=inter=1 TF_ENABLE_ONEDNN_OPTS=0 precision=float32")
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(result.stdout.strip().splitlines()[-1])
  settings = report["settings"]
  assert list(settings) == ["intra=1 inter=1", "inter=1 TF_ENABLE_ONEDNN_OPTS=0 precision=float32"]
  assert all(len(s["window_images_per_second"]) == 2 for s in settings.values())
  assert settings["intra=1 inter=1"]["vs_first"] == 1.0


def test_compare_settings_refuses_a_malformed_setting_and_names_a_failing_one():
  malformed = _compare_settings("--setting=intra")
  assert malformed.returncode == 2
  assert malformed.stderr.strip().splitlines()[-1] == \
      "error: --setting='intra': 'intra' is not KEY=VALUE"
  failing = _compare_settings("--depth=8", "--setting=no_such_flag=1")
  assert failing.returncode == 2
  assert failing.stderr.startswith("error: no_such_flag=1: the process exited")
  assert "Unknown command line flag 'no_such_flag'" in failing.stderr


def test_onednn_breakdown_sums_the_executed_primitives_per_step(tmp_path):
  conv = ("convolution,brg_conv_fwd:avx512_core,forward_training,src:f32::blocked:acdb::f0,"
          ",alg:convolution_direct,mb128_ic16oc16_ih32oh32kh3sh1dh0ph1_iw32ow32kw3sw1dw0pw1")
  log = tmp_path / "verbose.log"
  log.write_text("\n".join([
      "onednn_verbose,v1,info,oneDNN v3.7.3 (commit N/A)",
      "onednn_verbose,v1,info,cpu,runtime:threadpool,nthr:2",
      f"onednn_verbose,v1,primitive,create:cache_miss,cpu,{conv},0.5",
      f"onednn_verbose,v1,primitive,exec,cpu,{conv},3.0",
      f"onednn_verbose,v1,primitive,exec,cpu,{conv},5.0",
      "onednn_verbose,v1,primitive,exec,cpu,reorder,jit:uni,undef,src dst,,,16x3x3x3,0.25",
      "epoch 1.00 step 2/2 loss 2.3",
  ]) + "\n")
  result = subprocess.run([sys.executable, "scripts/onednn_breakdown.py", str(log),
                           "--steps=2"], cwd=REPO, capture_output=True, text=True, timeout=60)
  assert result.returncode == 0, result.stderr
  report = json.loads(result.stdout.strip().splitlines()[-1])
  assert report == {"onednn": "oneDNN v3.7.3 (commit N/A)", "steps": 2, "ms_per_step": {
      "convolution | brg_conv_fwd:avx512_core | forward_training": 4.0,
      "reorder | jit:uni | undef": 0.125}}
  empty = tmp_path / "empty.log"
  empty.write_text("no verbose lines\n")
  for path in (empty, tmp_path / "missing.log"):
    refused = subprocess.run([sys.executable, "scripts/onednn_breakdown.py", str(path),
                              "--steps=2"], cwd=REPO, capture_output=True, text=True,
                             timeout=60)
    assert refused.returncode == 2 and refused.stderr.startswith("error: "), refused.stderr

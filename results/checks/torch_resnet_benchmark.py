"""Training throughput of an independent PyTorch CIFAR ResNet (random data, fp32 or
--autocast=bfloat16, channels_last, SGD with momentum), for scripts/benchmark.py's
side-by-side comparison.
Not part of the trainer: runs in its own venv, with torch alone.

Set-up (a CPU wheel of torch 2.13.0 lies on the development machines' disk for pip):

  python3 -m venv /tmp/torch-venv && /tmp/torch-venv/bin/pip install torch==2.13.0

Standalone (prints images/s of timed windows after warm-up; the last line is JSON):

  /tmp/torch-venv/bin/python results/checks/torch_resnet_benchmark.py --depth=20 \
      --threads=2 --window_steps=20 --windows=5

With --serve it builds the model and then, for every line "STEPS" on stdin, trains that
many steps and answers one JSON line {"seconds": ..., "steps": ...} on stdout, so that
scripts/benchmark.py can interleave its windows with TensorFlow's (--torch_python).

The networks, written from He et al. (2015) and trainer/resnet.py's layouts:
- 6n+2 depths (20, 56, ...): CIFAR ResNets, 3x3 stem of 16 channels, stages of n basic
  blocks of 16/32/64 channels, option-A shortcuts (subsample, zero-pad channels evenly
  both sides);
- 18 and 50: the ImageNet-style networks with the CIFAR stem (3x3 stride 1, no max-pool),
  basic (18) or bottleneck (50, stride on the 3x3) blocks, widths 64-512 (bottleneck
  x4), 1x1 projection shortcuts + batch norm where the shape changes.
Batch norm: eps 1e-5, momentum 0.1 (Keras's 0.9). Kaiming-normal initialisation. The
trainable parameter counts equal the trainer's (ResNet-20 269,722; -56 853,018; -18
11,173,962; -50 23,520,842).
"""

import argparse
import json
import statistics
import sys
import time
import warnings

# torch warns at import when numpy is missing; the benchmark does not need numpy.
warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

IMAGENET_STAGES = {18: ("basic", (2, 2, 2, 2)), 50: ("bottleneck", (3, 4, 6, 3))}
IMAGENET_WIDTHS = (64, 128, 256, 512)
CIFAR_WIDTHS = (16, 32, 64)


def conv_bn(cin: int, cout: int, kernel: int, stride: int) -> list[nn.Module]:
  # padding kernel // 2 on both sides: the trainer's symmetric padding.
  return [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(cout)]


class OptionA(nn.Module):
  """Parameter-free shortcut: strided identity, channels zero-padded evenly both sides."""

  def __init__(self, cin: int, cout: int, stride: int):
    super().__init__()
    self.stride, self.extra = stride, cout - cin

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    if self.stride > 1:
      x = x[:, :, ::self.stride, ::self.stride]
    if self.extra:
      x = F.pad(x, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))
    return x


class Block(nn.Module):
  """Basic (two 3x3) or bottleneck (1x1, 3x3 strided, 1x1 x4) block; ReLU after the add."""

  def __init__(self, kind: str, cin: int, width: int, stride: int, option_a: bool):
    super().__init__()
    if kind == "basic":
      cout = width
      layers = [*conv_bn(cin, width, 3, stride), nn.ReLU(inplace=True),
                *conv_bn(width, width, 3, 1)]
    else:
      cout = 4 * width
      layers = [*conv_bn(cin, width, 1, 1), nn.ReLU(inplace=True),
                *conv_bn(width, width, 3, stride), nn.ReLU(inplace=True),
                *conv_bn(width, cout, 1, 1)]
    self.branch = nn.Sequential(*layers)
    if stride == 1 and cin == cout:
      self.shortcut = nn.Identity()
    elif option_a:
      self.shortcut = OptionA(cin, cout, stride)
    else:
      self.shortcut = nn.Sequential(*conv_bn(cin, cout, 1, stride))
    self.out_channels = cout

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return F.relu(self.branch(x) + self.shortcut(x))


def resnet(depth: int, num_classes: int = 10) -> nn.Module:
  """ResNet-`depth` for 32x32 images: 18/50 ImageNet-style with the CIFAR stem, else 6n+2."""
  if depth in IMAGENET_STAGES:
    (kind, sizes), widths, option_a = IMAGENET_STAGES[depth], IMAGENET_WIDTHS, False
  elif depth >= 8 and (depth - 2) % 6 == 0:
    kind, sizes, widths, option_a = "basic", ((depth - 2) // 6,) * 3, CIFAR_WIDTHS, True
  else:
    raise ValueError(f"depth {depth}: use 18, 50 or 6n+2")
  layers = [*conv_bn(3, widths[0], 3, 1), nn.ReLU(inplace=True)]
  cin = widths[0]
  for stage, (blocks, width) in enumerate(zip(sizes, widths)):
    for index in range(blocks):
      block = Block(kind, cin, width, 2 if stage and not index else 1, option_a)
      layers.append(block)
      cin = block.out_channels
  net = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                      nn.Linear(cin, num_classes))
  for module in net.modules():
    if isinstance(module, (nn.Conv2d, nn.Linear)):
      nn.init.kaiming_normal_(module.weight)
  return net


class Trainer:
  """The model, SGD with momentum and one random batch; `train(steps)` times steps."""

  def __init__(self, depth: int, batch_size: int, autocast: str | None = None):
    torch.manual_seed(0)
    # PyTorch's CPU mixed precision: float32 weights, the convolutions and matmuls in
    # bfloat16 (torch.autocast's CPU list), as the trainer's mixed_bfloat16 policy does.
    self.autocast = autocast
    self.net = resnet(depth).to(memory_format=torch.channels_last)
    self.optimizer = torch.optim.SGD(self.net.parameters(), lr=0.01, momentum=0.9,
                                     nesterov=True, weight_decay=1e-4)
    self.images = torch.randn(batch_size, 3, 32, 32).to(memory_format=torch.channels_last)
    self.labels = torch.randint(0, 10, (batch_size,))
    self.parameters = sum(p.numel() for p in self.net.parameters())
    self.net.train()

  def train(self, steps: int) -> float:
    """Seconds for `steps` training steps (forward, backward, update)."""
    start = time.perf_counter()
    for _ in range(steps):
      with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast is not None):
        loss = F.cross_entropy(self.net(self.images), self.labels)
      self.optimizer.zero_grad(set_to_none=True)
      loss.backward()
      self.optimizer.step()
    loss.item()  # The CPU runs eagerly; this only makes sure the last step is done.
    return time.perf_counter() - start


def serve(trainer: Trainer) -> None:
  """Answers every "STEPS" line on stdin with the seconds those steps took (JSON)."""
  print(json.dumps({"ready": True, "parameters": trainer.parameters,
                    "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "autocast": trainer.autocast}),
        flush=True)
  for line in sys.stdin:
    if line.strip():
      steps = int(line)
      print(json.dumps({"seconds": trainer.train(steps), "steps": steps}), flush=True)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--depth", type=int, default=20)
  parser.add_argument("--batch_size", type=int, default=128)
  parser.add_argument("--threads", type=int, default=None,
                      help="torch.set_num_threads and interop threads (default: torch's)")
  parser.add_argument("--window_steps", type=int, default=10)
  parser.add_argument("--windows", type=int, default=5)
  parser.add_argument("--warmup_windows", type=int, default=1)
  parser.add_argument("--autocast", choices=["bfloat16"], default=None,
                      help="train under torch.autocast on the CPU in this type")
  parser.add_argument("--serve", action="store_true",
                      help="train on request from stdin (see the module docstring)")
  args = parser.parse_args()
  if args.threads:
    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(args.threads)
  trainer = Trainer(args.depth, args.batch_size, args.autocast)
  if args.serve:
    serve(trainer)
    return
  for _ in range(args.warmup_windows):
    trainer.train(args.window_steps)
  rates = [args.window_steps * args.batch_size / trainer.train(args.window_steps)
           for _ in range(args.windows)]
  print(f"resnet{args.depth} (PyTorch {torch.__version__}, {trainer.parameters:,} "
        f"parameters, {torch.get_num_threads()} threads, "
        f"{args.autocast or 'float32'}): "
        f"{statistics.median(rates):.1f} images/s (windows: "
        f"{', '.join(f'{r:.1f}' for r in rates)})")
  print(json.dumps({"model": f"resnet{args.depth}", "framework": "pytorch",
                    "torch": torch.__version__, "batch_size": args.batch_size,
                    "threads": torch.get_num_threads(), "parameters": trainer.parameters,
                    "autocast": args.autocast,
                    "images_per_second": statistics.median(rates),
                    "window_images_per_second": rates}))


if __name__ == "__main__":
  main()

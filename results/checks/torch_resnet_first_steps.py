"""One-off cross-check, not part of the trainer: an independent PyTorch CIFAR ResNet (He et
al. 2015, option-A shortcuts, Kaiming-normal init) trained at he2016's settings for a few
hundred steps on the JPEG folder, to compare its first steps with ours. Needs torch and pillow.

Usage: python torch_resnet_first_steps.py [DATA_DIR] [STEPS] [DEPTH (56)] [WARMUP_STEPS (0)]
"""
import os
import sys

import numpy as np
from PIL import Image
import torch
from torch import nn
from torch.nn import functional as F

BATCH = 128


class Block(nn.Module):
  """Basic block; the shortcut subsamples and zero-pads channels (option A)."""

  def __init__(self, cin: int, cout: int, stride: int):
    super().__init__()
    self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(cout)
    self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(cout)
    self.extra, self.stride = cout - cin, stride

  def forward(self, x):
    y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
    shortcut = x[:, :, ::self.stride, ::self.stride]
    if self.extra:
      shortcut = F.pad(shortcut, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))
    return F.relu(y + shortcut)


def resnet(depth: int) -> nn.Module:
  layers, cin = [nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU()], 16
  for stage, width in enumerate((16, 32, 64)):
    for block in range((depth - 2) // 6):
      layers.append(Block(cin, width, 2 if stage and not block else 1))
      cin = width
  net = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))
  for module in net.modules():
    if isinstance(module, (nn.Conv2d, nn.Linear)):
      nn.init.kaiming_normal_(module.weight)
  return net


def main() -> None:
  data_dir = sys.argv[1] if len(sys.argv) > 1 else "../shared/datasets/cifar10-jpeg"
  steps = int(sys.argv[2]) if len(sys.argv) > 2 else 200
  depth = int(sys.argv[3]) if len(sys.argv) > 3 else 56
  # he2016 for depth >= 110: learning rate 0.01 for the first steps, then 0.1.
  warmup_steps = int(sys.argv[4]) if len(sys.argv) > 4 else 0
  torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
  torch.manual_seed(0)
  rng = np.random.default_rng(0)
  root = os.path.join(data_dir, "train")
  classes = sorted(os.listdir(root))
  files = [(os.path.join(root, c, f), label) for label, c in enumerate(classes)
           for f in sorted(os.listdir(os.path.join(root, c)))]
  # Epochs of fresh permutations, as many as the steps need.
  chosen = np.concatenate([rng.permutation(len(files))
                           for _ in range(-(-BATCH * steps // len(files)))])[:BATCH * steps]
  images = np.stack([np.asarray(Image.open(files[i][0]).convert("RGB")) for i in chosen])
  images = images.astype(np.float32)
  labels = torch.tensor([files[i][1] for i in chosen])
  images = (images - images.mean((0, 1, 2))) / images.std((0, 1, 2))
  images = torch.tensor(images).permute(0, 3, 1, 2).contiguous()

  net = resnet(depth)
  print("parameters", sum(p.numel() for p in net.parameters()))
  optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
  losses = []
  for step in range(steps):
    lr = 0.01 if step < warmup_steps else 0.1
    for group in optimizer.param_groups:
      group["lr"] = lr
    x = images[step * BATCH:(step + 1) * BATCH]
    y = labels[step * BATCH:(step + 1) * BATCH]
    # Pad-4 crop and flip, one draw per batch: enough for a first-steps check.
    top, left = rng.integers(0, 9, 2)
    x = F.pad(x, (4, 4, 4, 4))[:, :, top:top + 32, left:left + 32]
    if rng.random() < 0.5:
      x = x.flip(3)
    loss = F.cross_entropy(net(x), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    losses.append(loss.item())
    if step < 12 or 0 < warmup_steps <= step < warmup_steps + 12:
      print(f"step {step + 1} lr {lr} loss {losses[-1]:.4f}", flush=True)
    elif (step + 1) % 10 == 0:
      print(f"steps {step - 8}-{step + 1} mean loss {np.mean(losses[-10:]):.4f}", flush=True)


if __name__ == "__main__":
  main()

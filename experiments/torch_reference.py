"""Plain-PyTorch references for the experiments: the same architectures written in
`torch.nn` with PyTorch's default initialisation, trained by a textbook loop.

- `conv_base()`: the MNIST-1D paper's `ConvBase` (Greydanus & Kobak, the
  `mnist1d` repository's `models.py`): Conv1d 1->25 k5 s2 p1, 25->25 k3 s2 p1
  twice, ReLU after each, Linear 125->10; trained with the paper notebook's
  protocol by `train(..., steps=8000, shuffle=False)` (Adam 1e-2, batch 100, the
  data in order).
- `mnist_mlp()`, `mnist_cnn()`: the seed examples' MLP 784-128-10 and CNN
  (Conv 32 3x3 -> MaxPool 2 -> Dense 128 -> 10).

Inputs are fml's channels-last arrays; `train` moves channels first.
"""

import numpy as np
import torch
from torch import nn


class ConvBase(nn.Module):
    """The MNIST-1D paper's CNN on `[B, 40]` (or `[B, 40, 1]`) signals."""

    def __init__(self, channels: int = 25, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv1d(1, channels, 5, stride=2, padding=1)
        self.conv2 = nn.Conv1d(channels, channels, 3, stride=2, padding=1)
        self.conv3 = nn.Conv1d(channels, channels, 3, stride=2, padding=1)
        self.linear = nn.Linear(channels * 5, num_classes)

    def forward(self, x):
        h = x.reshape(x.shape[0], 1, -1)
        h = torch.relu(self.conv3(torch.relu(self.conv2(torch.relu(self.conv1(h))))))
        return self.linear(h.flatten(1))


def conv_base(num_classes: int = 10) -> nn.Module:
    return ConvBase(num_classes=num_classes)


def mnist_mlp(in_features: int = 784, num_classes: int = 10) -> nn.Module:
    """MLP in -> 128 -> classes, ReLU."""
    return nn.Sequential(
        nn.Flatten(), nn.Linear(in_features, 128), nn.ReLU(), nn.Linear(128, num_classes)
    )


def mnist_cnn(input_hw: tuple = (28, 28), channels: int = 1, num_classes: int = 10) -> nn.Module:
    """Conv 32 3x3 (valid) ReLU -> MaxPool 2 -> Dense 128 ReLU -> Dense classes."""
    h, w = ((input_hw[0] - 2) // 2, (input_hw[1] - 2) // 2)
    return nn.Sequential(
        nn.Conv2d(channels, 32, 3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * h * w, 128),
        nn.ReLU(),
        nn.Linear(128, num_classes),
    )


def _channels_first(x: np.ndarray) -> torch.Tensor:
    x = torch.as_tensor(np.asarray(x, np.float32))
    return x.movedim(-1, 1) if x.ndim == 4 else x


def train(
    module: nn.Module,
    data,
    *,
    learning_rate: float,
    batch_size: int,
    epochs: int | None = None,
    steps: int | None = None,
    shuffle: bool = True,
    seed: int = 0,
) -> float:
    """Adam on cross-entropy; returns the test accuracy after the last step.

    Args:
      module: a fresh `nn.Module` (initialised under `torch.manual_seed(seed)` here
        is too late; build it after calling `seeded(seed)`).
      data: an `fml.data.Dataset`.
      learning_rate, batch_size: Adam's learning rate; examples per step.
      epochs: passes over the training data, or
      steps: steps in all (cycling over the data), as the MNIST-1D notebook counts.
      shuffle: reshuffle every epoch (seeded), else the data in order.
      seed: seeds the shuffling.

    Runs on one torch thread (restored after): at these sizes a second thread only
    waits, and on a loaded machine its spinning makes each step many times slower.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(module, data, learning_rate, batch_size, epochs, steps, shuffle, seed)
    finally:
        torch.set_num_threads(threads)


def _train(module, data, learning_rate, batch_size, epochs, steps, shuffle, seed) -> float:
    x, y = _channels_first(data.x_train), torch.as_tensor(np.asarray(data.y_train, np.int64))
    n = len(x)
    per_epoch = -(-n // batch_size)
    total = steps if steps is not None else epochs * per_epoch
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(module.parameters(), lr=learning_rate)
    loss_fn = nn.CrossEntropyLoss()
    module.train()
    order = torch.arange(n)
    for step in range(total):
        position = step % per_epoch
        if position == 0:
            order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        index = order[position * batch_size : (position + 1) * batch_size]
        optimizer.zero_grad()
        loss_fn(module(x[index]), y[index]).backward()
        optimizer.step()
    return accuracy(module, data)


def accuracy(module: nn.Module, data) -> float:
    """Test accuracy of `module` on `data.x_test`."""
    module.eval()
    with torch.no_grad():
        logits = module(_channels_first(data.x_test))
    return float((logits.argmax(-1).numpy() == np.asarray(data.y_test)).mean())


def seeded(seed: int) -> None:
    """Seeds torch's global generator (the default init draws from it)."""
    torch.manual_seed(seed)

"""PyTorch runners: eager and `torch.compile`, Adam with `fused=True` (CPU kernels
exist since torch 2.4; falls back to `foreach` where not supported)."""

import torch

from benchmarks._harness import Runner
from benchmarks._workloads import LSTM_HIDDEN, NUM_CLASSES, Workload

LEARNING_RATE = 1e-3


class _LastStep(torch.nn.Module):
    """LSTM over batch-first `[B, T, D]`, classifier on the last hidden state."""

    def __init__(self, features: int):
        super().__init__()
        self.lstm = torch.nn.LSTM(features, LSTM_HIDDEN, batch_first=True)
        self.head = torch.nn.Linear(LSTM_HIDDEN, NUM_CLASSES)

    def forward(self, x):
        _, (h, _) = self.lstm(x)
        return self.head(h[-1])


def torch_module(workload: Workload) -> torch.nn.Module:
    """The workload's model in PyTorch's own layouts (NCHW for the CNN)."""
    nn = torch.nn
    if workload.name == "mlp":
        return nn.Sequential(nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, NUM_CLASSES))
    if workload.name == "cnn":
        return nn.Sequential(
            nn.Conv2d(1, 32, 3),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(13 * 13 * 32, 128),
            nn.ReLU(),
            nn.Linear(128, NUM_CLASSES),
        )
    if workload.name == "lstm":
        return _LastStep(workload.input_shape[-1])
    return nn.Linear(784, NUM_CLASSES)


def torch_inputs(workload: Workload, x):
    """numpy channels-last inputs -> a torch tensor in the module's layout."""
    t = torch.from_numpy(x)
    return t.permute(0, 3, 1, 2).contiguous() if workload.name == "cnn" else t


def adam(parameters):
    """`(optimizer, note)`: fused Adam where this build supports it on CPU, else foreach."""
    parameters = list(parameters)
    try:
        return torch.optim.Adam(parameters, lr=LEARNING_RATE, fused=True), "Adam fused=True"
    except (RuntimeError, ValueError):
        return torch.optim.Adam(parameters, lr=LEARNING_RATE, foreach=True), "Adam foreach=True"


def _runner(framework: str, workload: Workload, x, y, *, compiled: bool) -> Runner:
    torch.manual_seed(0)
    module = torch_module(workload)
    forward = torch.compile(module) if compiled else module
    opt, note = adam(module.parameters())
    loss_fn = torch.nn.CrossEntropyLoss()
    xs = torch_inputs(workload, x).split(workload.batch_size)
    ys = torch.from_numpy(y.astype("int64")).split(workload.batch_size)

    def step(x_B, y_B):
        opt.zero_grad(set_to_none=True)
        loss_fn(forward(x_B), y_B).backward()
        opt.step()

    def repeat():
        for _ in range(workload.passes):
            for x_B, y_B in zip(xs, ys):
                step(x_B, y_B)

    note = f"{note}, {torch.get_num_threads()} threads"
    return Runner(
        framework,
        note,
        lambda: step(xs[0], ys[0]),
        repeat,
        workload.samples_per_repeat,
        workload.batch_size,
    )


def eager_runner(workload: Workload, x, y) -> Runner:
    return _runner("PyTorch eager", workload, x, y, compiled=False)


def compiled_runner(workload: Workload, x, y) -> Runner:
    return _runner("torch.compile", workload, x, y, compiled=True)

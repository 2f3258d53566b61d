"""Peak resident memory of one training run (`/usr/bin/time -v`), fml against
PyTorch on the same model and data: the MLP workload, 3 epochs of 100 steps.
The PyTorch run is a separate script that never imports jax or fml."""

import re
import subprocess
import sys

TORCH_SCRIPT = """
import numpy as np, torch
rng = np.random.default_rng(0)
x = torch.from_numpy(rng.standard_normal((12800, 784), dtype=np.float32))
y = torch.from_numpy(rng.integers(0, 10, 12800))
net = torch.nn.Sequential(torch.nn.Linear(784, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
opt = torch.optim.Adam(net.parameters(), lr=1e-3, fused=True)
for epoch in range(3):
    for xb, yb in zip(x.split(128), y.split(128)):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(xb), yb).backward()
        opt.step()
"""

FML_SCRIPT = """
import numpy as np, fml
rng = np.random.default_rng(0)
x = rng.standard_normal((12800, 784), dtype=np.float32)
y = rng.integers(0, 10, 12800).astype(np.int32)
fml.fit(fml.models.mlp([128, 10]), (x, y), epochs=3, batch_size=128, fused=True, quiet=True)
"""


def peak_rss_mb(script: str) -> float:
    """Maximum resident set size of `python -c script`, in MiB."""
    done = subprocess.run(
        ["/usr/bin/time", "-v", sys.executable, "-c", script], capture_output=True, text=True
    )
    if done.returncode != 0:
        raise RuntimeError(f"training run failed: {done.stderr.strip()[-500:]}")
    kbytes = re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr)
    return int(kbytes.group(1)) / 1024


def peak_memory(log=print) -> dict:
    """`{"fml": MiB, "PyTorch": MiB}` for the same MLP training run."""
    log("[bench] peak memory: fml and PyTorch training runs")
    return {"fml": peak_rss_mb(FML_SCRIPT), "PyTorch": peak_rss_mb(TORCH_SCRIPT)}

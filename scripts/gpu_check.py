"""The GPU check (issue 15): fml on one accelerator, next to Flax and PyTorch, in one
process (no child process competes for the device), in under 5 minutes on an H100/H200.

    python scripts/gpu_check.py --out results/gpu_check     # on the GPU machine
    python scripts/gpu_check.py --tiny --out /tmp/gpu_check  # CPU smoke run (CI)

Writes `gpu_check.json` and `gpu_check.md` into `--out`:
- the device, and its measured matmul peaks (f32 at `highest`, the default precision
  — TF32 on NVIDIA — and bf16), from large square matmuls;
- per family (logistic regression, MLP, CIFAR-style CNN, GRU, GRU unrolled) and per
  compute dtype (float32, bfloat16): compile time and samples/s of the per-step
  program and of the fused epoch, FLOPs per example (XLA's cost analysis) and MFU
  against the measured bf16 peak;
- Flax (Linen) and PyTorch (on CUDA where there is one, with `torch.cuda.synchronize`)
  training the same MLP, CNN and GRU at the same batch size, per step;
- the CNN's conv gradients native vs im2col (`fml.layers.conv(..., platform=...)`);
- exports verified on this machine (the reference computed on the device at
  `highest` precision), and how far the default precision is from it;
- the device's peak memory, where the runtime reports it.

Uses fml's public API only.
"""

import argparse
import json
import math
import pathlib
import platform as host_platform
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

import fml
from fml import layers, models
from fml.export import export
from fml.export.reference import reference
from fml.models import presets
from fml.train import init_state, make_epoch, make_objective, make_optimizer, make_train_step

LEARNING_RATE = 1e-3
NUM_CLASSES = 10


def _sizes(tiny: bool) -> dict:
    """Batch sizes, steps and matmul sizes: full on an accelerator, tiny on a CPU."""
    if tiny:
        return {"batch": 16, "steps": 4, "repeats": 2, "matmul": 256, "conv_batch": 8}
    return {"batch": 256, "steps": 50, "repeats": 3, "matmul": 8192, "conv_batch": 256}


# The families of a tiny run: every code path (dense, conv + pool, scan), fewer compiles.
TINY_FAMILIES = ("mlp", "cnn", "gru")


def _families(tiny: bool) -> list[tuple[str, Callable, tuple]]:
    """(name, factory(dtype), input shape): the workloads, MNIST- and CIFAR-shaped."""
    cifar_layers = presets.cifar_cnn().spec["layer_specs"]
    families = [
        ("logistic", lambda dt: models.logistic_regression(NUM_CLASSES, dtype=dt), (784,)),
        ("mlp", lambda dt: models.mlp([512, 512, NUM_CLASSES], dtype=dt), (784,)),
        ("cnn", lambda dt: models.cnn(cifar_layers, dtype=dt), (32, 32, 3)),
        ("gru", lambda dt: models.rnn("gru", 64, num_classes=NUM_CLASSES, dtype=dt), (40, 1)),
        (
            "gru_unroll8",
            lambda dt: models.rnn("gru", 64, num_classes=NUM_CLASSES, unroll=8, dtype=dt),
            (40, 1),
        ),
    ]
    return [f for f in families if f[0] in TINY_FAMILIES] if tiny else families


def _data(input_shape, n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, *input_shape)).astype(np.float32)
    y = rng.integers(0, NUM_CLASSES, n).astype(np.int32)
    return x, y


def _block(tree):
    return jax.block_until_ready(tree)


def _best_time(fn: Callable, repeats: int) -> float:
    """The fastest of `repeats` timed calls of `fn` (which blocks on its result)."""
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _flops(compiled) -> float | None:
    """FLOPs of a compiled program, from XLA's cost analysis (None if not reported)."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - some backends do not implement it
        return None
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else {}
    flops = (cost or {}).get("flops")
    return float(flops) if flops and flops > 0 else None


# ----------------------------------------------------------------------- peaks


def matmul_peaks(n: int, repeats: int) -> dict:
    """Measured TFLOP/s of an `n x n` matmul: f32 at highest precision, f32 at the
    default precision (TF32 on NVIDIA GPUs), bf16."""
    peaks = {}
    for name, dtype, precision in [
        ("f32_highest", jnp.float32, "highest"),
        ("f32_default", jnp.float32, "default"),
        ("bf16", jnp.bfloat16, "default"),
    ]:
        a = jax.random.normal(jax.random.key(0), (n, n), dtype)
        b = jax.random.normal(jax.random.key(1), (n, n), dtype)
        with jax.default_matmul_precision(precision):
            matmul = jax.jit(lambda a, b: a @ b)
            _block(matmul(a, b))
        seconds = _best_time(lambda m=matmul, a=a, b=b: _block(m(a, b)), repeats)
        peaks[name] = 2 * n**3 / seconds / 1e12
    return peaks


# ------------------------------------------------------------------------- fml


def fml_rows(sizes: dict, peak_bf16: float, *, tiny: bool) -> list[dict]:
    """Compile time and samples/s of every family's per-step program and fused epoch."""
    rows = []
    batch, steps, repeats = sizes["batch"], sizes["steps"], sizes["repeats"]
    for name, factory, input_shape in _families(tiny):
        x, y = _data(input_shape, batch * steps)
        x_dev, y_dev = jax.device_put(x), jax.device_put(y)
        for dtype in ("float32", "bfloat16"):
            model = factory(dtype)
            optimizer = make_optimizer("adam", LEARNING_RATE)
            state = init_state(model, optimizer, input_shape)
            train_step = make_train_step(model, make_objective(model), optimizer)
            batch_dev = {
                "x": x_dev[:batch],
                "y": y_dev[:batch],
                "mask": jnp.ones((batch,), jnp.float32),
            }
            start = time.perf_counter()
            step = jax.jit(train_step).lower(state, batch_dev).compile()
            step_compile = time.perf_counter() - start
            flops = _flops(step)

            def run_steps(step=step, state=state, batch_dev=batch_dev):
                s = state
                for _ in range(steps):
                    s, _ = step(s, batch_dev)
                _block(s)

            run_steps()
            step_seconds = _best_time(run_steps, repeats)
            epoch_fn = make_epoch(train_step, batch_size=batch)
            key = jax.random.key(0)
            start = time.perf_counter()
            epoch = jax.jit(epoch_fn).lower(state, x_dev, y_dev, key).compile()
            epoch_compile = time.perf_counter() - start

            def run_epoch(epoch=epoch, state=state, key=key, x_dev=x_dev, y_dev=y_dev):
                _block(epoch(state, x_dev, y_dev, key))

            run_epoch()
            epoch_seconds = _best_time(run_epoch, repeats)
            flops_per_example = flops / batch if flops else None
            for mode, compile_s, seconds in [
                ("step", step_compile, step_seconds),
                ("fused", epoch_compile, epoch_seconds),
            ]:
                samples_per_s = batch * steps / seconds
                mfu = (
                    flops_per_example * samples_per_s / (peak_bf16 * 1e12)
                    if flops_per_example and peak_bf16
                    else None
                )
                rows.append(
                    {
                        "family": name,
                        "dtype": dtype,
                        "mode": mode,
                        "batch": batch,
                        "compile_s": compile_s,
                        "samples_per_s": samples_per_s,
                        "flops_per_example": flops_per_example,
                        "mfu": mfu,
                    }
                )
    return rows


# ----------------------------------------------------------------------- peers


def flax_rows(sizes: dict) -> list[dict]:
    """Flax Linen MLP and CNN, the same layers as fml's, adam, per step."""
    import flax.linen as nn

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = x.reshape(x.shape[0], -1)
            x = nn.relu(nn.Dense(512)(x))
            x = nn.relu(nn.Dense(512)(x))
            return nn.Dense(NUM_CLASSES)(x)

    class CNN(nn.Module):
        @nn.compact
        def __call__(self, x):
            for features in (32, 64):
                x = nn.relu(nn.Conv(features, (3, 3), padding=1)(x))
                x = nn.max_pool(x, (2, 2), (2, 2))
            x = nn.relu(nn.Dense(128)(x.reshape(x.shape[0], -1)))
            return nn.Dense(NUM_CLASSES)(x)

    rows = []
    for name, module, input_shape in [("mlp", MLP(), (784,)), ("cnn", CNN(), (32, 32, 3))]:
        x, y = _data(input_shape, sizes["batch"])
        x, y = jax.device_put(x), jax.device_put(y)
        params = module.init(jax.random.key(0), x[:1])
        tx = optax.adam(LEARNING_RATE)

        def step(carry, x, y, module=module, tx=tx):
            params, opt_state = carry

            def loss(p):
                logits = module.apply(p, x)
                return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

            grads = jax.grad(loss)(params)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state

        start = time.perf_counter()
        compiled = jax.jit(step).lower((params, tx.init(params)), x, y).compile()
        compile_s = time.perf_counter() - start
        carry = (params, tx.init(params))

        def run(compiled=compiled, carry=carry, x=x, y=y):
            c = carry
            for _ in range(sizes["steps"]):
                c = compiled(c, x, y)
            _block(c)

        run()
        seconds = _best_time(run, sizes["repeats"])
        rows.append(
            {
                "framework": "flax",
                "family": name,
                "device": str(jax.devices()[0].platform),
                "compile_s": compile_s,
                "samples_per_s": sizes["batch"] * sizes["steps"] / seconds,
            }
        )
    return rows


def torch_rows(sizes: dict) -> list[dict]:
    """PyTorch MLP, CNN and GRU (cuDNN on CUDA), adam, per step, synchronised."""
    import torch
    from torch import nn

    device = "cuda" if torch.cuda.is_available() else "cpu"

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    class GRU(nn.Module):
        def __init__(self):
            super().__init__()
            self.gru = nn.GRU(1, 64, batch_first=True)
            self.head = nn.Linear(64, NUM_CLASSES)

        def forward(self, x):
            return self.head(self.gru(x)[1][-1])

    nets = [
        (
            "mlp",
            nn.Sequential(
                nn.Flatten(),
                nn.Linear(784, 512),
                nn.ReLU(),
                nn.Linear(512, 512),
                nn.ReLU(),
                nn.Linear(512, NUM_CLASSES),
            ),
            (784,),
        ),
        (
            "cnn",
            nn.Sequential(
                nn.Conv2d(3, 32, 3, padding=1),
                nn.ReLU(),
                nn.MaxPool2d(2),
                nn.Conv2d(32, 64, 3, padding=1),
                nn.ReLU(),
                nn.MaxPool2d(2),
                nn.Flatten(),
                nn.Linear(64 * 8 * 8, 128),
                nn.ReLU(),
                nn.Linear(128, NUM_CLASSES),
            ),
            (3, 32, 32),
        ),
        ("gru", GRU(), (40, 1)),
    ]
    rows = []
    for name, net, input_shape in nets:
        net = net.to(device)
        optimizer = torch.optim.Adam(net.parameters(), lr=LEARNING_RATE)
        x, y = _data(input_shape, sizes["batch"])
        x, y = torch.tensor(x, device=device), torch.tensor(y, device=device).long()

        def step(net=net, optimizer=optimizer, x=x, y=y):
            optimizer.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(net(x), y).backward()
            optimizer.step()

        def run(step=step):
            for _ in range(sizes["steps"]):
                step()
            sync()

        run()
        seconds = _best_time(run, sizes["repeats"])
        rows.append(
            {
                "framework": "torch",
                "family": name,
                "device": device,
                "compile_s": None,
                "samples_per_s": sizes["batch"] * sizes["steps"] / seconds,
            }
        )
    return rows


# ------------------------------------------------------------------ conv paths


def conv_paths(sizes: dict) -> dict:
    """Seconds per forward+backward of the CIFAR CNN's two convolutions, with the
    gradient native (what cuda/tpu run) and im2col (what CPU runs)."""
    batch = sizes["conv_batch"]
    key1, key2, key3 = jax.random.split(jax.random.key(0), 3)
    p1 = layers.conv_init(key1, 3, 32, (3, 3))
    p2 = layers.conv_init(key2, 32, 64, (3, 3))
    x = jax.random.normal(key3, (batch, 32, 32, 3))
    seconds = {}
    for path in layers.PLATFORM_PATHS:

        def loss(params, x, path=path):
            h = jax.nn.relu(layers.conv(params[0], x, padding=1, platform=path))
            h = layers.max_pool(h, 2)
            return jnp.sum(layers.conv(params[1], h, padding=1, platform=path) ** 2)

        grad = jax.jit(jax.grad(loss))
        _block(grad((p1, p2), x))
        seconds[path] = _best_time(lambda g=grad: _block(g((p1, p2), x)), sizes["repeats"] * 3)
    return {"batch": batch, "native_s": seconds["native"], "im2col_s": seconds["cpu"]}


# --------------------------------------------------------------------- exports


def export_rows(out: pathlib.Path) -> list[dict]:
    """Exports verified here: the reference runs on this device at `highest`; also
    how far the default precision's forward pass is from it."""
    rows = []
    targets = ["torch"]
    try:
        import tensorflow  # noqa: F401

        targets.append("savedmodel")
    except ImportError:
        pass
    for name, model, input_shape in [
        ("mlp", models.mlp([512, 512, NUM_CLASSES]), (784,)),
        ("cnn", presets.cifar_cnn(), (32, 32, 3)),
        ("gru", presets.mnist1d_gru(), (40, 1)),
    ]:
        params = model.init(jax.random.key(0), input_shape)
        x, _ = _data(input_shape, 64)
        default = np.asarray(jax.jit(model.apply)(params, x))
        highest = np.asarray(reference(model)(params, x))
        for target in targets:
            path = out / "exports" / f"{name}.{target}"
            try:
                result = export(model, params, path, to=target, input_shape=input_shape)
                diff, tol, ok = result.max_abs_diff, result.tolerance, True
            except fml.FmlError as e:
                diff, tol, ok = None, None, f"failed: {e}"
            rows.append(
                {
                    "family": name,
                    "target": target,
                    "max_abs_diff": diff,
                    "tolerance": tol,
                    "verified": ok,
                    "default_vs_highest": float(np.max(np.abs(default - highest))),
                }
            )
    return rows


# ----------------------------------------------------------------------- report


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown(report: dict) -> str:
    peaks = report["peak_tflops"]
    lines = [
        f"# GPU check: {report['device']}",
        "",
        f"jax {report['jax']}, {'tiny' if report['tiny'] else 'full'} run, "
        f"{report['total_s']:.0f} s. Measured peak TFLOP/s: f32 highest "
        f"{peaks['f32_highest']:.1f}, f32 default {peaks['f32_default']:.1f}, "
        f"bf16 {peaks['bf16']:.1f}. Peak device memory: "
        f"{_fmt(report['peak_memory_bytes'] and report['peak_memory_bytes'] / 2**30, '.2f')} GiB.",
        "",
        "| family | dtype | mode | batch | compile s | samples/s | MFU (bf16 peak) |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in report["fml"]:
        lines.append(
            f"| {r['family']} | {r['dtype']} | {r['mode']} | {r['batch']} | "
            f"{r['compile_s']:.2f} | {r['samples_per_s']:,.0f} | {_fmt(r['mfu'], '.2%')} |"
        )
    lines += ["", "| peer | family | device | samples/s (per step) |", "| --- | --- | --- | ---: |"]
    for r in report["peers"]:
        lines.append(
            f"| {r['framework']} | {r['family']} | {r['device']} | {r['samples_per_s']:,.0f} |"
        )
    conv = report["conv"]
    lines += [
        "",
        f"CNN conv forward+backward at batch {conv['batch']}: native "
        f"{conv['native_s'] * 1e3:.2f} ms, im2col {conv['im2col_s'] * 1e3:.2f} ms.",
        "",
        "| export | family | max abs diff | tolerance | verified | default vs highest |",
        "| --- | --- | ---: | ---: | --- | ---: |",
    ]
    for r in report["exports"]:
        lines.append(
            f"| {r['target']} | {r['family']} | {_fmt(r['max_abs_diff'], '.2e')} | "
            f"{_fmt(r['tolerance'], '.1e')} | {r['verified']} | {r['default_vs_highest']:.2e} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny sizes: a CPU smoke run")
    parser.add_argument("--out", default="gpu_check", help="directory for the JSON and table")
    args = parser.parse_args(argv)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    sizes = _sizes(args.tiny)
    device = jax.devices()[0]
    peaks = matmul_peaks(sizes["matmul"], sizes["repeats"])
    report = {
        "device": f"{device.platform}: {device.device_kind}",
        "host": host_platform.node(),
        "jax": jax.__version__,
        "tiny": args.tiny,
        "sizes": sizes,
        "peak_tflops": peaks,
        "fml": fml_rows(sizes, peaks["bf16"], tiny=args.tiny),
        "peers": [*flax_rows(sizes), *torch_rows(sizes)],
        "conv": conv_paths(sizes),
        "exports": export_rows(out),
    }
    stats = device.memory_stats() or {}
    report["peak_memory_bytes"] = stats.get("peak_bytes_in_use")
    report["total_s"] = time.perf_counter() - start
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2))
    (out / "gpu_check.md").write_text(markdown(report))
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()

"""Speed and memory of CrossDConv against plain convolutions, in one run, as ratios.

    python benchmarks/crossd_conv.py --device cpu --out benchmarks/results/crossd_conv_cpu.md

Layers: B=8, C=64 -> 64, k=3, 56x56 (2D) and 32^3 (3D); forward and forward+backward,
median of repeated runs after warm-up, and the compute operations of one forward+backward
(every ATen call that is not a view: a dispatch on a CPU, a kernel launch on a GPU).
Networks: one ResNet-18 training step (forward, backward, SGD step) at B=8, 112x112,
plain against Cross-D with dynamic rotation (exact and reference mode), time, compute
operations and peak memory. 'Step peak' is the most memory allocated during one step
above what was allocated before it (parameters, gradients and optimiser state),
from the profiler's allocation records on the CPU and ``torch.cuda.max_memory_allocated``
on CUDA, each arm in a fresh process; CUDA also reports the total peak.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from napari_crossd import CrossDConv
from napari_crossd.core.operation_count import compute_operations
from napari_crossd.models import build_model


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def shuffled(items: list, round_index: int) -> list:
    """A fixed random order per round: no arm always runs first, after the heavy 3D ones."""
    items = list(items)
    random.Random(round_index).shuffle(items)
    return items


def median_seconds(step, device: str, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        step()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)




def layer_arms(channels: int) -> dict[str, tuple[nn.Module, int]]:
    """name -> (layer, spatial dims)."""

    def crossd(rotation, mode="fourier"):
        return CrossDConv(channels, channels, 3, padding=1, bias=mode == "fourier", rotation=rotation,
                          rotation_mode=mode)

    return {
        "nn.Conv2d": (nn.Conv2d(channels, channels, 3, padding=1), 2),
        "CrossDConv 2D none": (crossd("none"), 2),
        "CrossDConv 2D static": (crossd("static"), 2),
        "CrossDConv 2D dynamic": (crossd("dynamic"), 2),
        "CrossDConv 2D reference (dynamic)": (crossd("dynamic", "reference"), 2),
        "nn.Conv3d": (nn.Conv3d(channels, channels, 3, padding=1), 3),
        "CrossDConv 3D none": (crossd("none"), 3),
        "CrossDConv 3D static": (crossd("static"), 3),
    }


def bench_layers(device: str, batch: int, channels: int, size_2d: int, size_3d: int, repeats: int) -> list[dict]:
    """Every arm timed once per round in shuffled order: drift in the machine hits all arms alike."""
    arms = []
    for name, (layer, spatial) in layer_arms(channels).items():
        layer = layer.to(device).train()
        shape = (batch, channels) + ((size_2d,) * 2 if spatial == 2 else (size_3d,) * 3)
        x = torch.randn(shape, device=device, requires_grad=True)

        def forward(layer=layer, x=x):
            with torch.no_grad():
                layer(x)

        def forward_backward(layer=layer, x=x):
            layer.zero_grad(set_to_none=False)
            layer(x).sum().backward()

        arms.append((name, shape, forward, forward_backward))
    times = {name: ([], []) for name, *_ in arms}
    for round_index in range(repeats + 2):
        for name, _, forward, forward_backward in shuffled(arms, round_index):
            for step, series in zip((forward, forward_backward), times[name], strict=True):
                seconds = median_seconds(step, device, repeats=1, warmup=0)
                if round_index >= 2:  # the first two rounds warm up
                    series.append(seconds)
    return [
        {"arm": name, "input": "x".join(map(str, shape)),
         "forward_ms": 1e3 * statistics.median(times[name][0]),
         "forward_backward_ms": 1e3 * statistics.median(times[name][1]),
         "operations": compute_operations(forward_backward)}
        for name, shape, _, forward_backward in arms
    ]


RESNET_ARMS = {
    "ResNet-18 plain": ("resnet18", {}),
    "ResNet-18 Cross-D dynamic": ("crossd_resnet18", {"rotation": "dynamic", "rotation_mode": "fourier"}),
    "ResNet-18 Cross-D reference": ("crossd_resnet18", {"rotation": "dynamic", "rotation_mode": "reference"}),
}


def cpu_step_peak_bytes(step) -> int:
    """Peak of bytes allocated during ``step`` above what was allocated before it, on the CPU.

    From the profiler's per-operator allocations (frees count negative), replayed in order:
    exact where the process's resident set is not (the C allocator keeps freed pages).
    """
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    live = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


def resnet_training_step(arm: str, device: str, batch: int, size: int):
    """A model of ``arm`` and a closure running one training step (forward, backward, SGD)."""
    torch.manual_seed(0)
    arch, kwargs = RESNET_ARMS[arm]
    model = build_model(arch, num_classes=10, **kwargs).to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 10, (batch,), device=device)

    def step():
        optimizer.zero_grad(set_to_none=False)
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()

    return model, step


def resnet_memory(arm: str, device: str, batch: int, size: int) -> dict:
    """One arm in this process: resting state and step peak memory."""
    model, step = resnet_training_step(arm, device, batch, size)
    step()  # gradients and momentum allocated: the resting state of training
    state_bytes = sum(p.numel() * p.element_size() for p in model.parameters()) * 3  # params, grads, momentum
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        step_peak = peak - torch.cuda.memory_allocated()
    else:
        step_peak = cpu_step_peak_bytes(step)
        peak = None
    return {"state_mb": state_bytes / 2**20, "step_peak_mb": step_peak / 2**20,
            "total_peak_mb": None if peak is None else peak / 2**20}


def bench_resnets(device: str, batch: int, size: int, repeats: int) -> list[dict]:
    # Time: all arms in this process, one step each per round, so machine drift hits all alike.
    steps = {arm: resnet_training_step(arm, device, batch, size)[1] for arm in RESNET_ARMS}
    times = {arm: [] for arm in RESNET_ARMS}
    for round_index in range(repeats + 2):
        for arm, step in shuffled(list(steps.items()), round_index):
            seconds = median_seconds(step, device, repeats=1, warmup=0)
            if round_index >= 2:
                times[arm].append(seconds)
    operations = {arm: compute_operations(step) for arm, step in steps.items()}
    del steps
    rows = []
    for arm in RESNET_ARMS:
        # Memory: a fresh process per arm, so that no peak carries over between arms.
        result = subprocess.run(
            [sys.executable, __file__, "--resnet-arm", arm, "--device", device, "--batch", str(batch),
             "--resnet-size", str(size)],
            check=True, capture_output=True, text=True,
        )
        memory = json.loads(result.stdout.strip().splitlines()[-1])
        rows.append({"arm": arm, "step_ms": 1e3 * statistics.median(times[arm]), "operations": operations[arm],
                     **memory})
    return rows


def machine(device: str) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    text = f"{cpu}, {os.cpu_count()} logical CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads"
    if device == "cuda":
        text += f", {torch.cuda.get_device_name()}"
    return text


def report(device: str, layers: list[dict], resnets: list[dict], args) -> str:
    lines = [f"# CrossDConv benchmark ({device})", "", f"Machine: {machine(device)}.", "",
             f"Command: `python benchmarks/crossd_conv.py --device {device}` "
             f"(B={args.batch}, C={args.channels}, k=3, {args.size_2d}x{args.size_2d} and {args.size_3d}^3; "
             f"median of {args.repeats} interleaved rounds).", "",
             "| layer | input | forward ms | fwd+bwd ms | forward ratio | fwd+bwd ratio | fwd+bwd ops |",
             "|---|---|---:|---:|---:|---:|---:|"]
    baselines = {name: next(r for r in layers if r["arm"] == name) for name in ("nn.Conv2d", "nn.Conv3d")}
    for row in layers:
        base = baselines["nn.Conv2d" if "2D" in row["arm"] or row["arm"] == "nn.Conv2d" else "nn.Conv3d"]
        lines.append(f"| {row['arm']} | {row['input']} | {row['forward_ms']:.2f} | {row['forward_backward_ms']:.2f} | "
                     f"{row['forward_ms'] / base['forward_ms']:.2f}x | "
                     f"{row['forward_backward_ms'] / base['forward_backward_ms']:.2f}x | {row['operations']} |")
    lines += ["", f"ResNet-18 training step (forward, backward, SGD), B={args.batch}, {args.resnet_size}x"
              f"{args.resnet_size}, 10 classes. 'state' = parameters + gradients + momentum; "
              "'step peak' = peak memory during the step above the memory held before it; 'ops' = "
              "compute operations of one step.", "",
              "| network | step ms | ratio | ops | state MB | step peak MB | step peak ratio | total peak MB |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    plain = resnets[0]
    for row in resnets:
        total = "n/a" if row["total_peak_mb"] is None else f"{row['total_peak_mb']:.0f}"
        lines.append(f"| {row['arm']} | {row['step_ms']:.1f} | {row['step_ms'] / plain['step_ms']:.2f}x | "
                     f"{row['operations']} | {row['state_mb']:.0f} | {row['step_peak_mb']:.0f} | "
                     f"{row['step_peak_mb'] / plain['step_peak_mb']:.2f}x | {total} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--size-2d", type=int, default=56)
    parser.add_argument("--size-3d", type=int, default=32)
    parser.add_argument("--resnet-size", type=int, default=112)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--resnet-arm", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.resnet_arm:
        print(json.dumps(resnet_memory(args.resnet_arm, args.device, args.batch, args.resnet_size)))
        return
    layers = bench_layers(args.device, args.batch, args.channels, args.size_2d, args.size_3d, args.repeats)
    resnets = bench_resnets(args.device, args.batch, args.resnet_size, args.repeats)
    text = report(args.device, layers, resnets, args)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()

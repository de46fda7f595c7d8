"""Throughput (voxels per second) of segmentation on a Dask distributed cluster of 1, 2, 4 worker processes.

Arms, side by side in one run, each repeated (``--repeats``, in rotating order so that a
slow spell of the machine does not fall on one arm): the local path (``segment``, no
cluster, torch on every core) and ``segment_on_cluster_job`` on a ``LocalCluster`` of 1, 2
and 4 worker processes with one thread each, on 127.0.0.1. The volume is a real MNI152 T1
region (``--shape``, from the centre of the template); the segmenter (default model,
features and forest, 4 tissue classes) is trained once on strokes on 4 of its slices.
Agreement is the fraction of voxels whose label equals the local run's.

    python benchmarks/cluster_throughput.py [--shape 96 128 128] [--block 64] [--repeats 3]
        [--out benchmarks/results/cluster_throughput_cpu.md]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _region(shape):
    from napari_crossd.datasets import load_mni152

    sample = load_mni152()
    starts = [(n - s) // 2 for n, s in zip(sample.image.shape, shape, strict=True)]
    box = tuple(slice(a, a + s) for a, s in zip(starts, shape, strict=True))
    return sample.image[box], sample.labels[box]


def _trained(volume, truth):
    from napari_crossd.engine import Segmenter, finetune, prepare_model
    from napari_crossd.evaluation import paint_strokes

    segmenter = Segmenter(prepare_model("default"), ["background", "other", "grey", "white"])
    finetune(segmenter, volume, paint_strokes(truth, slices=4, seed=0), device="cpu")
    return segmenter


def _local(segmenter, volume):
    from napari_crossd.engine import segment

    return segment(segmenter, volume, device="cpu", probabilities=False)[0]


def _on_cluster(client, segmenter, volume, block):
    from napari_crossd.engine import run_job
    from napari_crossd.engine.cluster import segment_on_cluster_job

    return run_job(segment_on_cluster_job(client, segmenter, volume, device="cpu", block=block))[0]


def main() -> None:
    from distributed import Client, LocalCluster

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=(96, 128, 128))
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, nargs="+", default=(1, 2, 4))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/cluster_throughput_cpu.md")
    args = parser.parse_args()

    volume, truth = _region(tuple(args.shape))
    segmenter = _trained(volume, truth)
    reference = _local(segmenter, volume)
    clusters = {}
    for n in args.workers:
        cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True, host="127.0.0.1",
                               dashboard_address=None)
        clusters[n] = (cluster, Client(cluster, set_as_default=False))
        _on_cluster(clusters[n][1], segmenter, volume[:32, :64, :64], args.block)  # workers import torch first

    arms = {"local (no cluster, 2 torch threads)": lambda: _local(segmenter, volume)}
    for n, (_, client) in clusters.items():
        arms[f"{n} worker process{'es' if n > 1 else ''} x 1 thread"] = (
            lambda client=client: _on_cluster(client, segmenter, volume, args.block))
    times = {name: [] for name in arms}
    agreement = {}
    names = list(arms)
    for repeat in range(args.repeats):
        for name in names[repeat % len(names):] + names[: repeat % len(names)]:
            start = time.perf_counter()
            labels = arms[name]()
            times[name].append(time.perf_counter() - start)
            agreement[name] = float((labels == reference).mean())
            print(f"{name}: {times[name][-1]:.1f} s", flush=True)
    for cluster, client in clusters.values():
        client.close()
        cluster.close()
    _write(args, volume, times, agreement)


def _write(args, volume, times, agreement) -> None:
    import torch

    voxels = volume.size
    lines = [
        "# Segmentation throughput on a Dask distributed `LocalCluster`",
        "",
        f"Run {datetime.date.today()} with `python benchmarks/cluster_throughput.py "
        f"--shape {' '.join(map(str, args.shape))} --block {args.block} --repeats {args.repeats}` on "
        f"{platform.machine()}, {os.cpu_count()} CPU cores, "
        f"torch {torch.__version__}; a {'x'.join(map(str, volume.shape))} MNI152 T1 region ({voxels:,} voxels), "
        f"4-class segmenter (default model, features and forest), blocks of {args.block}^3 plus the features' halo.",
        "",
        "| arm | median time | min - max | voxels per second | labels equal to the local run |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, values in times.items():
        median = statistics.median(values)
        lines.append(f"| {name} | {median:.1f} s | {min(values):.1f} - {max(values):.1f} s | "
                     f"{voxels / median:,.0f} | {agreement[name]:.4f} |")
    args.out.write_text("\n".join(lines) + "\n")
    print(args.out.read_text())


if __name__ == "__main__":
    main()

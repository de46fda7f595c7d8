"""Peak memory and time of `crossd segment` on memory-mapped uint8 volumes of 128^3, 256^3, 512^3.

Each size runs in its own process (the command line a user would type), which reports
its own peak resident set (``VmHWM`` of ``/proc/self/status``: the high-water mark of its
own address space; ``ru_maxrss`` would also count the parent's pages it shared between
fork and exec), libraries included.
The volumes are the MNI152 T1 repeated to fill the cube
(real anatomy, written slab by slab into a ``.npy`` memmap); the model is a 2-class
segmenter (brain / outside) trained on 5 painted slices of the template.

    python benchmarks/segment_memory.py [--sizes 128 256 512] [--out benchmarks/results/segment_memory_cpu.md]
    python benchmarks/segment_memory.py --auto-context --out benchmarks/results/segment_memory_context_cpu.md

``--auto-context`` keeps auto-context on where the cross-validation would turn it off (a
second training with ``select=False``, the chosen levels kept): its second forest and the
class maps of every block are then part of the peak and the time.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _train(model_dir: Path, auto_context: bool) -> str:
    from napari_crossd.datasets import load_mni152
    from napari_crossd.engine import Segmenter, finetune, prepare_model, save_segmenter
    from napari_crossd.evaluation import paint_strokes

    sample = load_mni152()
    truth = np.where(sample.labels > 1, 2, 1).astype(np.uint8)
    segmenter = Segmenter(prepare_model("default"), ["outside", "brain"])
    strokes = paint_strokes(truth, slices=5, seed=0)
    finetune(segmenter, sample.image, strokes, device="cpu")
    if auto_context and not segmenter.two_stage:
        finetune(segmenter, sample.image, strokes, device="cpu", select=False)
    save_segmenter(segmenter, model_dir)
    return segmenter.describe()


def _volume(path: Path, size: int) -> None:
    """An ``size``^3 uint8 ``.npy`` of the MNI152 T1 tiled periodically, written slab by slab."""
    from napari_crossd.datasets import load_mni152

    t1 = load_mni152().image
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(size,) * 3)
    ys, xs = np.arange(size) % t1.shape[1], np.arange(size) % t1.shape[2]
    for z in range(size):
        out[z] = t1[z % t1.shape[0]][np.ix_(ys, xs)]
    out.flush()
    del out


# `crossd segment ...`, then the process's own peak resident set (kB) on the last line.
_CLI_WITH_PEAK = (
    "import sys\n"
    "from napari_crossd.cli import main\n"
    "code = main(sys.argv[1:])\n"
    "hwm = next(line for line in open('/proc/self/status') if line.startswith('VmHWM'))\n"
    "print('peak_kb', hwm.split()[1])\n"
    "sys.exit(code)\n"
)


def _segment(volume: Path, model_dir: Path, out: Path) -> tuple[float, float]:
    """Wall seconds and peak resident GiB of one `crossd segment` process."""
    command = [sys.executable, "-c", _CLI_WITH_PEAK, "segment", str(volume), "--model", str(model_dir),
               "--device", "cpu", "--out", str(out)]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"crossd segment failed:\n{done.stdout}\n{done.stderr}")
    peak_kb = int(done.stdout.strip().splitlines()[-1].split()[1])
    return seconds, peak_kb / 2**20  # kB -> GiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256, 512])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "segment_memory_cpu.md")
    parser.add_argument("--auto-context", action="store_true", help="the segmenter with auto-context, forced on")
    args = parser.parse_args()
    import torch

    rows = []
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        described = _train(work / "model", args.auto_context)
        for size in args.sizes:
            volume = work / f"t1_{size}.npy"
            _volume(volume, size)
            seconds, peak = _segment(volume, work / "model", work / f"seg_{size}.npy")
            labels = np.load(work / f"seg_{size}.npy", mmap_mode="r")
            brain = float((labels[::4, ::4, ::4] == 2).mean())
            rows.append((size, seconds, peak, peak * 2**30 / size**3, brain))
            print(f"{size}^3: {seconds:.0f} s, peak {peak:.2f} GiB", flush=True)
            volume.unlink()
    lines = [
        "# `crossd segment` on memory-mapped uint8 volumes: peak memory and time",
        "",
        f"Run {datetime.date.today()} with `python benchmarks/segment_memory.py` on {platform.machine()}, "
        f"{torch.get_num_threads()} torch threads, CPU, torch {torch.__version__}; 2-class segmenter (default model, "
        "default features and forest) trained on 5 painted slices of the MNI152 T1; each volume is that T1 tiled "
        "periodically into a `.npy` memmap, segmented by one `crossd segment` process writing `.npy` labels. "
        "Peak = the process's maximum resident set (libraries included).",
        "",
        f"Segmenter: {described}.",
        "",
        "| volume | wall time | peak resident | bytes per voxel | brain fraction (sanity) |",
        "|---|---:|---:|---:|---:|",
        *(f"| {s}^3 | {t:.0f} s | {p:.2f} GiB | {b:.1f} | {f:.3f} |" for s, t, p, b, f in rows),
        "",
    ]
    args.out.write_text("\n".join(lines))
    print(args.out.read_text())


if __name__ == "__main__":
    main()

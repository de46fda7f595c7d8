"""``crossd``: the command line over the same API the napari widgets use.

    crossd inflate SRC --arch auto --strategy i3d --out model3d.safetensors
    crossd info
    crossd features IMAGE --model M --out OUT
    crossd finetune IMAGE LABELS --model M --out MODEL_DIR
    crossd segment IMAGE --model MODEL_DIR --out SEG.nii.gz
    crossd pretrain DATA --arch ARCH --conv {crossd,plain} --epochs N --out DIR [--resume CKPT]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from . import __version__


def _inflate(args: argparse.Namespace) -> None:
    from .io import load_model, save_model
    from .models.inflate import inflate

    start = time.perf_counter()
    print(f"loading {args.src} ...", flush=True)
    model = load_model(args.src, arch=args.arch)
    meta = model.crossd_meta
    print(f"  {meta.arch} ({meta.format} weights, {meta.num_classes} classes)", flush=True)
    print(f"inflating to 3D with strategy {args.strategy!r} ...", flush=True)
    model3d = inflate(model, strategy=args.strategy, official_shift=args.official_shift,
                      depth_preserving_stages=args.depth_preserving_stages)
    written = save_model(model3d, args.out)
    parameters = sum(p.numel() for p in model3d.parameters())
    print(f"  {parameters:,} parameters; wrote {', '.join(map(str, written))} "
          f"in {time.perf_counter() - start:.1f} s")


def _info(args: argparse.Namespace) -> None:
    import torch

    from .models import list_models
    from .models.inflate import STRATEGIES

    print(f"napari-crossd {__version__}, torch {torch.__version__}")
    print(f"CUDA: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'not available'}")
    print(f"architectures: {', '.join(list_models())}")
    print(f"inflation strategies: {', '.join(STRATEGIES)}")


class _TerminalProgress:
    """A progress bar per phase (:attr:`Progress.phase`) on stderr: redrawn in place at most ten times a second on a
    terminal; elsewhere (logs, CI) one line when a phase starts and one when it ends."""

    def __init__(self) -> None:
        self._phase = None
        self._drawn = 0.0
        self._live = sys.stderr.isatty()

    def __call__(self, report) -> None:
        phase = report.phase
        new_phase = phase != self._phase
        finished = report.total is not None and report.step >= report.total
        now = time.monotonic()
        if not (new_phase or finished or (self._live and now - self._drawn >= 0.1)):
            return
        if new_phase and self._phase is not None and self._live:
            sys.stderr.write("\n")
        self._phase, self._drawn = phase, now
        bar = ""
        if report.total:
            done = int(30 * report.step / report.total)
            bar = f"[{'#' * done}{'.' * (30 - done)}] {report.step}/{report.total} "
        sys.stderr.write(f"\r{bar}{report.message}"[:150].ljust(100) if self._live else f"{bar}{report.message}\n")
        sys.stderr.flush()

    def close(self) -> None:
        if self._phase is not None and self._live:
            sys.stderr.write("\n")
        self._phase = None


def _encoder(args: argparse.Namespace):
    """The 3D network named by --model: a checkpoint, a fine-tuned model directory, or 'default'."""
    from .engine import load_segmenter, prepare_model

    if Path(args.model).is_dir():
        return load_segmenter(args.model).encoder
    return prepare_model(args.model, strategy=args.strategy)


def _run(job):
    from .engine import run_job

    progress = _TerminalProgress()
    try:
        return run_job(job, progress)
    finally:
        progress.close()


def _features(args: argparse.Namespace) -> None:
    from .engine import features_job, pca_rgb, resolve_device
    from .io import read_volume, strided_grid, write_volume
    from .io.volumes import volume_suffix

    for out in (args.out, args.pca):
        if out is not None:
            volume_suffix(out)
    volume = read_volume(args.image, spacing=args.spacing)
    model = _encoder(args)
    print(f"{args.image.name}: {volume.data.shape} voxels; {model.crossd_meta.arch} "
          f"({model.crossd_meta.strategy or 'crossd'}) on {resolve_device(args.device)}", flush=True)
    features = _run(features_job(model, volume.data, spacing=volume.spacing, levels=args.levels, stride=args.stride,
                                 preset=args.preset, tile=args.tile, overlap=args.overlap, batch=args.batch,
                                 device=args.device))
    like = volume if args.stride == 1 else strided_grid(volume, args.stride)
    written = [write_volume(args.out, features, like)]
    if args.pca:
        written.append(write_volume(args.pca, pca_rgb(features).transpose(3, 0, 1, 2), like))
    print(f"wrote {', '.join(map(str, written))}: {features.shape[0]} channels")


def _read_labels(path: Path, shape: tuple) -> object:
    import numpy as np

    from .io import read_volume

    labels = read_volume(path).data
    if labels.shape != shape:
        raise ValueError(f"{path.name} has shape {labels.shape}; expected the image's {shape}.")
    labels = np.asarray(labels)
    if np.issubdtype(labels.dtype, np.floating):
        if not np.array_equal(labels, np.round(labels)):
            raise ValueError(f"{path.name} holds non-integer values: expected 0 (not annotated) and 1..N.")
        labels = labels.astype(np.int64)
    return labels


def _finetune(args: argparse.Namespace) -> None:
    from .engine import Annotations, Segmenter, finetune_job, load_segmenter, save_segmenter
    from .io import read_volume

    volume = read_volume(args.image, spacing=args.spacing)
    labels = _read_labels(args.labels, volume.data.shape)
    if Path(args.model).is_dir():
        segmenter = load_segmenter(args.model)
        print(f"retraining {args.model} ({segmenter.trained_voxels:,} voxels last time) on {args.labels}", flush=True)
    else:
        annotations = Annotations.from_labels(labels, volume.data.shape)  # the one label rule: widget, CLI, engine
        if annotations.num_classes > 64:
            raise ValueError(f"{args.labels.name} has labels up to {annotations.num_classes}: expected a few classes "
                             "(0 = not annotated, 1..N). Is it the image instead of the labels?")
        names = args.classes or [f"class {i}" for i in range(1, annotations.num_classes + 1)]
        if len(names) != annotations.num_classes:
            raise ValueError(f"{len(names)} class names for labels 1..{annotations.num_classes}.")
        segmenter = Segmenter(_encoder(args), names, preset=args.preset)
    job = finetune_job(segmenter, volume.data, labels, spacing=volume.spacing, full=args.full, steps=args.steps,
                       tile=args.tile, overlap=args.overlap, batch=args.batch, device=args.device, seed=args.seed)
    summary = _run(job)
    written = save_segmenter(segmenter, args.out)
    print(f"trained on {summary['voxels']:,} painted voxels of classes {summary['classes']}, "
          f"{segmenter.describe()}; saved to {written[0].parent}")


def _segment(args: argparse.Namespace) -> None:
    from .engine import load_segmenter, segment_job
    from .io import read_volume, write_volume
    from .io.checkpoints import NAMED_WEIGHTS
    from .io.volumes import volume_suffix

    for out in (args.out, args.probabilities):
        if out is not None:
            volume_suffix(out)

    if not Path(args.model).exists() and args.model not in NAMED_WEIGHTS:
        raise FileNotFoundError(f"--model {args.model}: no such model directory.")
    if not Path(args.model).is_dir():
        raise ValueError(f"--model {args.model}: segment needs a fine-tuned model directory "
                         "(made by 'crossd finetune IMAGE LABELS --out DIR').")
    segmenter = load_segmenter(args.model)
    volume = read_volume(args.image, spacing=args.spacing)
    labels, probabilities = _run(segment_job(segmenter, volume.data, spacing=volume.spacing, tile=args.tile,
                                             overlap=args.overlap, batch=args.batch, device=args.device,
                                             probabilities=args.probabilities is not None))
    written = [write_volume(args.out, labels, volume)]
    if args.probabilities:
        written.append(write_volume(args.probabilities, probabilities, volume))
    counts = ", ".join(f"{name} {int((labels == i + 1).sum())}" for i, name in enumerate(segmenter.class_names))
    print(f"wrote {', '.join(map(str, written))}; voxels per class: {counts}")


def _volume_arguments(parser: argparse.ArgumentParser, model_help: str) -> None:
    from .engine.devices import DEVICES
    from .engine.normalize import PRESETS
    from .models.inflate import STRATEGIES

    parser.add_argument("--model", default="default", help=model_help)
    parser.add_argument("--strategy", default="i3d", choices=STRATEGIES,
                        help="inflation strategy when --model holds 2D weights (default: i3d)")
    parser.add_argument("--device", default="auto", choices=DEVICES, help="where to run (default: auto)")
    parser.add_argument("--preset", default="auto", choices=PRESETS, help="intensity normalisation (default: auto)")
    parser.add_argument("--spacing", type=float, nargs=3, metavar=("Z", "Y", "X"),
                        help="voxel size (default: the NIfTI header's; isotropic for TIFF/NumPy)")
    parser.add_argument("--tile", type=int, help="sliding-window tile edge in voxels (default: by device)")
    parser.add_argument("--overlap", type=float, default=0.25, help="tile overlap fraction (default 0.25)")
    parser.add_argument("--batch", type=int, default=1, help="tiles per forward pass (default 1)")


def build_parser() -> argparse.ArgumentParser:
    from .models import ARCHITECTURES
    from .models.inflate import OFFICIAL_SHIFTS, STRATEGIES
    from .training import add_pretrain_arguments, run_pretrain

    parser = argparse.ArgumentParser(prog="crossd", description="Cross-D Conv: 2D-pretrained CNNs on 3D volumes.")
    parser.add_argument("--version", action="version", version=f"napari-crossd {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    inflate = commands.add_parser(
        "inflate", help="load 2D weights and write the inflated 3D network (.safetensors + .json)",
        description="Load a 2D checkpoint (torchvision, official Cross-D, or saved by napari-crossd), "
                    "inflate it to 3D and save it so that napari_crossd.load_model reloads it.",
    )
    inflate.add_argument("src", help="2D checkpoint (.pth/.pt/.ckpt/.safetensors), or 'default' for the "
                                     "Cross-D MobileNetV2 shipped with the package, "
                                     "'imagenet' for torchvision's ImageNet MobileNetV2")
    inflate.add_argument("--arch", default="auto", choices=("auto", *ARCHITECTURES),
                         help="architecture (default: detected from the weights)")
    inflate.add_argument("--strategy", default="i3d", choices=STRATEGIES,
                         help="how plain 2D kernels become 3D (default: i3d)")
    inflate.add_argument("--official-shift", default="keep", choices=OFFICIAL_SHIFTS,
                         help="official Cross-D checkpoints: use the 3D kernel as is (keep) or undo the "
                              "one-voxel roll of the official 2D computation (undo)")
    inflate.add_argument("--depth-preserving-stages", type=int, default=0, metavar="N",
                         help="keep depth kernel extent and stride at 1 in the first N stages (thick slices)")
    inflate.add_argument("--out", type=Path, required=True, help="output .safetensors path")
    inflate.set_defaults(run=_inflate)

    pretrain = commands.add_parser(
        "pretrain", help="2D supervised pretraining of a Cross-D or plain backbone (one process or torchrun/DDP)",
        description="Train a backbone on labelled 2D images; also runs under "
                    "'torchrun --nproc_per_node N -m napari_crossd.cli pretrain ...' (DistributedDataParallel).",
    )
    add_pretrain_arguments(pretrain)
    pretrain.set_defaults(run=run_pretrain)

    from .demo import REGIONS
    from .demo import main as run_demo

    demo = commands.add_parser(
        "demo", help="napari with the MNI152 sample, default weights and the plugin's widgets (or --headless)",
        description="Open napari with the MNI152 sample volume, the default 2D weights inflated to 3D and the "
                    "plugin's widgets docked. --headless runs the same pipeline (features, strokes, fine-tuning, "
                    "segmentation) without a display and writes its outputs and a screenshot to --out.",
    )
    demo.add_argument("--headless", action="store_true", help="no window: run the pipeline and write to --out")
    demo.add_argument("--out", type=Path, help="output folder (--headless)")
    demo.add_argument("--region", choices=tuple(REGIONS),
                      help="part of the MNI152 volume (default: full with a window, slab headless)")
    demo.add_argument("--strategy", default="i3d", choices=STRATEGIES, help="inflation strategy (default i3d)")
    demo.add_argument("--device", default="auto", help="auto, cpu, cuda or mps (--headless)")
    demo.set_defaults(run=run_demo)

    models = "checkpoint (.pth/.safetensors), a fine-tuned model directory, or 'default'"
    features = commands.add_parser(
        "features", help="hypercolumn features of a volume (channels first .npy, or 4D NIfTI on its grid)",
        description="Inflate the model, run it over IMAGE in tiles and write every voxel's multi-scale features.",
    )
    features.add_argument("image", type=Path, help="volume: .nii/.nii.gz, .tif/.tiff or .npy")
    _volume_arguments(features, models)
    features.add_argument("--levels", type=int, nargs="+", help="encoder levels (default: strides up to 8)")
    features.add_argument("--stride", type=int, default=1, help="output stride (default 1: the image's grid)")
    features.add_argument("--pca", type=Path, help="also write the 3-channel PCA view here")
    features.add_argument("--out", type=Path, required=True, help="output .npy (C, Z, Y, X), .nii.gz or .tif")
    features.set_defaults(run=_features)

    finetune = commands.add_parser(
        "finetune", help="train a voxel classifier on painted labels (0 = not annotated)",
        description="Train on LABELS (same grid as IMAGE; 0 = not annotated, 1..N = classes) and save the "
                    "model to --out: a random forest on each voxel's filter bank and encoder features. With "
                    "--model DIR from an earlier run, its encoder and settings are retrained on LABELS "
                    "(pass all strokes, old and new).",
    )
    finetune.add_argument("image", type=Path, help="volume: .nii/.nii.gz, .tif/.tiff or .npy")
    finetune.add_argument("labels", type=Path, help="label volume on the image's grid")
    _volume_arguments(finetune, models)
    finetune.add_argument("--full", action="store_true",
                          help="first fine-tune the encoder on crops around the strokes (slower; for images "
                               "unlike anything the weights were trained on)")
    finetune.add_argument("--steps", type=int, default=150, help="encoder fine-tuning steps with --full (default 150)")
    finetune.add_argument("--classes", nargs="+", metavar="NAME", help="class names, label 1 first")
    finetune.add_argument("--seed", type=int, default=0)
    finetune.add_argument("--out", type=Path, required=True, help="output model directory")
    finetune.set_defaults(run=_finetune)

    segment = commands.add_parser(
        "segment", help="label every voxel with a fine-tuned model (same grid and affine as the image)",
        description="Segment IMAGE with a model directory written by 'crossd finetune'.",
    )
    segment.add_argument("image", type=Path, help="volume: .nii/.nii.gz, .tif/.tiff or .npy")
    _volume_arguments(segment, "fine-tuned model directory (crossd finetune --out)")
    segment.add_argument("--probabilities", type=Path, help="also write per-class probabilities (C, Z, Y, X) here")
    segment.add_argument("--out", type=Path, required=True, help="output label volume (.nii.gz, .tif or .npy)")
    segment.set_defaults(run=_segment)

    info = commands.add_parser("info", help="versions, devices, architectures and strategies")
    info.set_defaults(run=_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except (ValueError, FileNotFoundError) as err:
        # Bad input is the user's to fix: say what, without a traceback.
        print(f"crossd {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"crossd {args.command}: cancelled", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``crossd``: the command line over the same API the napari widgets use.

    crossd inflate SRC --arch auto --strategy i3d --out model3d.safetensors
    crossd info
    crossd features IMAGE [IMAGE ...] --model M (--out OUT | --out-dir DIR) [--scheduler ADDRESS]
    crossd finetune (IMAGE LABELS | --pairs PAIRS.csv) --model M --out MODEL_DIR
    crossd segment IMAGE [IMAGE ...] --model MODEL_DIR (--out SEG.nii.gz | --out-dir DIR) [--scheduler ADDRESS]
    crossd pretrain DATA --arch ARCH --conv {crossd,plain} --epochs N --out DIR [--resume CKPT]
"""

from __future__ import annotations

import argparse
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .demo import REGIONS
from .demo import main as run_demo
from .engine import (
    Segmenter,
    finetune_pairs_job,
    load_segmenter,
    prepare_model,
    resolve_device,
    run_job,
    save_segmenter,
)
from .engine.annotations import annotations_of_volumes
from .engine.batch import features_files_job, output_paths, read_pairs, segment_files_job
from .engine.cluster import DEFAULT_BLOCK
from .engine.devices import DEVICES
from .engine.normalize import PRESETS
from .io import load_model, read_volume, save_model
from .io.checkpoints import NAMED_WEIGHTS
from .models import ARCHITECTURES, list_models
from .models.inflate import OFFICIAL_SHIFTS, STRATEGIES, inflate
from .training import add_pretrain_arguments, run_pretrain


def _inflate(args: argparse.Namespace) -> None:
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
    if Path(args.model).is_dir():
        return load_segmenter(args.model).encoder
    return prepare_model(args.model, strategy=args.strategy)


def _run(job):
    progress = _TerminalProgress()
    try:
        return run_job(job, progress)
    finally:
        progress.close()


_WORKER_WAIT_S = 120


@contextmanager
def _cluster(address: str | None):
    """A ``distributed.Client`` of the scheduler at ``address`` (None: no cluster, work here)."""
    if address is None:
        yield None
        return
    from distributed import Client  # only with --scheduler: distributed takes a second to import

    try:
        client = Client(address, timeout="20s")
    except (OSError, TimeoutError) as err:
        raise ValueError(f"--scheduler {address}: no Dask scheduler answers there ({err}).") from None
    try:
        try:
            client.wait_for_workers(1, timeout=_WORKER_WAIT_S)  # an adaptive cluster may start them on demand
        except TimeoutError:
            raise ValueError(f"--scheduler {address}: no worker joined within {_WORKER_WAIT_S} s.") from None
        print(f"cluster {address}: {len(client.nthreads())} workers, {sum(client.nthreads().values())} threads",
              flush=True)
        yield client
    finally:
        client.close()


def _outputs(args: argparse.Namespace, extras: tuple[str, ...]) -> list[Path]:
    """One output path per input: --out for a single input, DIR/<input name> with --out-dir."""
    if args.out is not None:
        if len(args.images) > 1:
            raise ValueError(f"--out names one file for {len(args.images)} inputs: use --out-dir DIR.")
        return [args.out]
    for extra in extras:
        if getattr(args, extra) is not None:
            raise ValueError(f"--{extra} writes one file: use it with --out and a single input.")
    outputs = output_paths(args.images, args.out_dir)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    return outputs


def _report(results) -> None:
    """Print what became of each input; a ValueError naming every input that failed."""
    for result in results:
        if result.ok:
            print(f"{result.source.name}: wrote {', '.join(map(str, result.written))}; {result.summary}", flush=True)
        else:
            print(f"  {result.source.name}: failed: {result.error}", file=sys.stderr)
    failed = [r for r in results if not r.ok]
    if failed:
        names = ", ".join(r.source.name for r in failed)
        first = failed[0].error if len(failed) == 1 else f"{len(results) - len(failed)} of {len(results)} done"
        raise ValueError(f"{len(failed)} of {len(results)} inputs failed ({names}): {first}")


def _features(args: argparse.Namespace) -> None:
    outputs = _outputs(args, ("pca",))
    model = _encoder(args)
    where = args.scheduler or resolve_device(args.device)
    print(f"{model.crossd_meta.arch} ({model.crossd_meta.strategy or 'crossd'}) on {where}", flush=True)
    with _cluster(args.scheduler) as client:
        job = features_files_job(
            model, args.images, outputs, spacing=args.spacing, client=client, block=args.block, stride=args.stride,
            pca=args.pca, levels=args.levels, preset=args.preset, tile=args.tile, overlap=args.overlap,
            batch=args.batch, device=args.device,
        )
        _report(_run(job))


def _label_array(path: Path, shape: tuple) -> np.ndarray:
    """A label file's integer array, on the image's grid."""
    labels = np.asarray(read_volume(path).data)
    if labels.shape != shape:
        raise ValueError(f"{path.name} has shape {labels.shape}; expected the image's {shape}.")
    if np.issubdtype(labels.dtype, np.floating):
        if not np.array_equal(labels, np.round(labels)):
            raise ValueError(f"{path.name} holds non-integer values: expected 0 (not annotated) and 1..N.")
        labels = labels.astype(np.int64)
    return labels


def _read_strokes(files: list[tuple[Path, Path]], volumes) -> list:
    """The strokes of every label file, one file in memory at a time (the one label rule)."""
    shapes = [v.data.shape for v in volumes]
    arrays = (_label_array(labels, shape) for (_, labels), shape in zip(files, shapes, strict=True))
    strokes = annotations_of_volumes(arrays, shapes, [labels.name for _, labels in files])
    for (_, labels), painted in zip(files, strokes, strict=True):
        if painted.num_classes > 64:
            raise ValueError(f"{labels.name} has labels up to {painted.num_classes}: expected a few classes "
                             "(0 = not annotated, 1..N). Is it the image instead of the labels?")
    return strokes


def _training_files(args: argparse.Namespace) -> list[tuple[Path, Path]]:
    if args.pairs is not None:
        if args.image is not None:
            raise ValueError("Give IMAGE LABELS or --pairs CSV, not both.")
        return read_pairs(args.pairs)
    if args.image is None or args.labels is None:
        raise ValueError("Give an image and its labels (IMAGE LABELS), or --pairs PAIRS.csv.")
    return [(args.image, args.labels)]


def _finetune(args: argparse.Namespace) -> None:
    files = _training_files(args)
    volumes = [read_volume(image, spacing=args.spacing) for image, _ in files]
    strokes = _read_strokes(files, volumes)
    if Path(args.model).is_dir():
        segmenter = load_segmenter(args.model)
        print(f"retraining {args.model} ({segmenter.trained_voxels:,} voxels last time) on "
              f"{', '.join(labels.name for _, labels in files)}", flush=True)
    else:
        num_classes = max(a.num_classes for a in strokes)
        names = args.classes or [f"class {i}" for i in range(1, num_classes + 1)]
        if len(names) != num_classes:
            raise ValueError(f"{len(names)} class names for labels 1..{num_classes}.")
        context = {"context": None} if args.no_context else {}  # else the engine's default
        segmenter = Segmenter(_encoder(args), names, preset=args.preset, **context)
    job = finetune_pairs_job(
        segmenter, [(v.data, a) for v, a in zip(volumes, strokes, strict=True)], names=[i.name for i, _ in files],
        spacing=[v.spacing for v in volumes], full=args.full, steps=args.steps, tile=args.tile, overlap=args.overlap,
        batch=args.batch, device=args.device, seed=args.seed,
    )
    summary = _run(job)
    written = save_segmenter(segmenter, args.out)
    print(f"trained on {summary['voxels']:,} painted voxels of classes {summary['classes']} in {len(files)} "
          f"volume{'s' if len(files) > 1 else ''}, {segmenter.describe()}; saved to {written[0].parent}")


def _fine_tuned(model: str):
    if not Path(model).exists() and model not in NAMED_WEIGHTS:
        raise FileNotFoundError(f"--model {model}: no such model directory.")
    if not Path(model).is_dir():
        raise ValueError(f"--model {model}: segment needs a fine-tuned model directory "
                         "(made by 'crossd finetune IMAGE LABELS --out DIR').")
    return load_segmenter(model)


def _segment(args: argparse.Namespace) -> None:
    outputs = _outputs(args, ("probabilities",))
    segmenter = _fine_tuned(args.model)
    with _cluster(args.scheduler) as client:
        job = segment_files_job(
            segmenter, args.images, outputs, spacing=args.spacing, client=client, block=args.block,
            probabilities=args.probabilities, tile=args.tile, overlap=args.overlap, batch=args.batch,
            device=args.device,
        )
        _report(_run(job))


def _volume_arguments(parser: argparse.ArgumentParser, model_help: str) -> None:
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


def _batch_arguments(parser: argparse.ArgumentParser, out_help: str) -> None:
    parser.add_argument("images", type=Path, nargs="+", metavar="IMAGE",
                        help="volumes: .nii/.nii.gz, .tif/.tiff or .npy")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--out", type=Path, help=out_help)
    where.add_argument("--out-dir", type=Path, help="write DIR/<input file name> for each input, in its format")
    parser.add_argument("--scheduler", metavar="ADDRESS",
                        help="run the blocks on this Dask distributed scheduler, e.g. tcp://host:8786")
    parser.add_argument("--block", type=int, default=DEFAULT_BLOCK,
                        help=f"with --scheduler: block edge in voxels per task (default {DEFAULT_BLOCK})")


_MODELS = "checkpoint (.pth/.safetensors), a fine-tuned model directory, or 'default'"


def _add_inflate(commands) -> None:
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


def _add_pretrain(commands) -> None:
    pretrain = commands.add_parser(
        "pretrain", help="2D supervised pretraining of a Cross-D or plain backbone (one process or torchrun/DDP)",
        description="Train a backbone on labelled 2D images; also runs under "
                    "'torchrun --nproc_per_node N -m napari_crossd.cli pretrain ...' (DistributedDataParallel).",
    )
    add_pretrain_arguments(pretrain)
    pretrain.set_defaults(run=run_pretrain)


def _add_demo(commands) -> None:
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


def _add_features(commands) -> None:
    features = commands.add_parser(
        "features", help="hypercolumn features of volumes (channels first .npy, or 4D NIfTI on their grid)",
        description="Inflate the model, run it over each IMAGE in tiles and write every voxel's multi-scale "
                    "features. A file that fails is reported by name and the others still complete.",
    )
    _batch_arguments(features, "output .npy (C, Z, Y, X), .nii.gz or .tif (one input)")
    _volume_arguments(features, _MODELS)
    features.add_argument("--levels", type=int, nargs="+", help="encoder levels (default: strides up to 8)")
    features.add_argument("--stride", type=int, default=1, help="output stride (default 1: the image's grid)")
    features.add_argument("--pca", type=Path, help="also write the 3-channel PCA view here (one input)")
    features.set_defaults(run=_features)


def _add_finetune(commands) -> None:
    finetune = commands.add_parser(
        "finetune", help="train a voxel classifier on painted labels (0 = not annotated)",
        description="Train on LABELS (same grid as IMAGE; 0 = not annotated, 1..N = classes), or on every "
                    "image,labels row of --pairs PAIRS.csv together, and save the model to --out: a random forest "
                    "on each voxel's filter bank and encoder features. With --model DIR from an earlier run, its "
                    "encoder and settings are retrained on LABELS (pass all strokes, old and new).",
    )
    finetune.add_argument("image", type=Path, nargs="?", help="volume: .nii/.nii.gz, .tif/.tiff or .npy")
    finetune.add_argument("labels", type=Path, nargs="?", help="label volume on the image's grid")
    finetune.add_argument("--pairs", type=Path, metavar="PAIRS.csv",
                          help="CSV of image,labels rows (paths relative to the CSV allowed; header optional)")
    _volume_arguments(finetune, _MODELS)
    finetune.add_argument("--full", action="store_true",
                          help="first fine-tune the encoder on crops around the strokes (slower; for images "
                               "unlike anything the weights were trained on; one image)")
    finetune.add_argument("--steps", type=int, default=150, help="encoder fine-tuning steps with --full (default 150)")
    finetune.add_argument("--no-context", action="store_true",
                          help="no auto-context: one forest on the voxel features (by default a second forest also "
                               "reads the first one's smoothed class maps where cross-validation says it pays)")
    finetune.add_argument("--classes", nargs="+", metavar="NAME", help="class names, label 1 first")
    finetune.add_argument("--seed", type=int, default=0)
    finetune.add_argument("--out", type=Path, required=True, help="output model directory")
    finetune.set_defaults(run=_finetune)


def _add_segment(commands) -> None:
    segment = commands.add_parser(
        "segment", help="label every voxel with a fine-tuned model (same grid and affine as each image)",
        description="Segment each IMAGE with a model directory written by 'crossd finetune'. A file that fails "
                    "is reported by name and the others still complete; the exit status is 2 if any failed.",
    )
    _batch_arguments(segment, "output label volume (.nii.gz, .tif or .npy; one input)")
    _volume_arguments(segment, "fine-tuned model directory (crossd finetune --out)")
    segment.add_argument("--probabilities", type=Path, help="also write per-class probabilities (C, Z, Y, X) here")
    segment.set_defaults(run=_segment)


def _add_info(commands) -> None:
    info = commands.add_parser("info", help="versions, devices, architectures and strategies")
    info.set_defaults(run=_info)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="crossd", description="Cross-D Conv: 2D-pretrained CNNs on 3D volumes.")
    parser.add_argument("--version", action="version", version=f"napari-crossd {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    for add in (_add_inflate, _add_pretrain, _add_demo, _add_features, _add_finetune, _add_segment, _add_info):
        add(commands)
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

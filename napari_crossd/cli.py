"""``crossd``: the command line over the same API the napari widgets use.

    crossd inflate SRC --arch auto --strategy i3d --out model3d.safetensors
    crossd info
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
    print(f"  {meta['arch']} ({meta['format']} weights, {meta['num_classes']} classes)", flush=True)
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


def build_parser() -> argparse.ArgumentParser:
    from .models import ARCHITECTURES
    from .models.inflate import OFFICIAL_SHIFTS, STRATEGIES

    parser = argparse.ArgumentParser(prog="crossd", description="Cross-D Conv: 2D-pretrained CNNs on 3D volumes.")
    parser.add_argument("--version", action="version", version=f"napari-crossd {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    inflate = commands.add_parser(
        "inflate", help="load 2D weights and write the inflated 3D network (.safetensors + .json)",
        description="Load a 2D checkpoint (torchvision, official Cross-D, or saved by napari-crossd), "
                    "inflate it to 3D and save it so that napari_crossd.load_model reloads it.",
    )
    inflate.add_argument("src", help="2D checkpoint (.pth/.pt/.ckpt/.safetensors), or 'default' for the "
                                     "ImageNet MobileNetV2 weights installed with the package")
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
    return 0


if __name__ == "__main__":
    sys.exit(main())

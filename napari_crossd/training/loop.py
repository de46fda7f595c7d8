"""Supervised 2D pretraining of a Cross-D (or plain) backbone, one process or many under torchrun.

Launch::

    crossd pretrain fashion-mnist --arch mobilenet_v2 --conv crossd --epochs 3 --out runs/fm
    torchrun --nproc_per_node 4 -m napari_crossd.cli pretrain DATA --arch resnet18 --out runs/r18
    torchrun --nnodes 2 --node_rank 0 --master_addr HOST --nproc_per_node 8 -m napari_crossd.cli pretrain ...

torchrun starts the processes and sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``; this module
only joins the process group it describes (NCCL on CUDA, gloo on CPU) and wraps the model
in DistributedDataParallel. Without those variables it trains in one process.

What lands in ``--out``:

- ``epoch_NNNN.pt``: the training state after epoch NNNN (model, optimiser, scheduler,
  AMP scaler, epoch, step, RNG states of every rank as tensors, configuration, history),
  readable with ``torch.load(weights_only=True)``; ``--resume`` continues from it exactly.
- ``model.safetensors`` + ``model.json``: the latest weights as
  :func:`napari_crossd.io.save_model` writes them, which :func:`napari_crossd.load_model`
  opens (with class names, input normalisation and a ``training`` summary).
- ``log.jsonl``: one JSON line per epoch (loss, accuracy, learning rate, time, replica check).

Exact resume: the data order comes from ``DistributedSampler`` (seeded by seed and
epoch), augmentation from per-sample generators seeded by (seed, epoch, index), and
everything else that draws random numbers (dropout) from the global RNGs, whose states
are restored per rank. A run interrupted after any epoch and resumed with the same world
size therefore ends with the parameters of an uninterrupted run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import random
import sys
import time
import warnings
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, Subset

from napari_crossd.io import save_model
from napari_crossd.io.atomic import atomic_path
from napari_crossd.models.meta import ModelMeta, Normalization, TrainingRecord
from napari_crossd.models.registry import ARCHITECTURES, CROSSD_PREFIX, build_model

from .data import open_dataset

__all__ = ["PretrainConfig", "add_pretrain_arguments", "evaluate", "load_checkpoint", "pretrain", "run_pretrain"]

CHECKPOINT_FORMAT = "napari-crossd-pretrain-1"
_BASE_ARCHS = tuple(a for a in ARCHITECTURES if not a.startswith(CROSSD_PREFIX))
# Settings that define the computation: a resumed run must use the values it was saved with.
_FIXED_ON_RESUME = (
    "data", "arch", "conv", "rotation", "rotation_mode", "batch_size", "lr", "optimizer", "momentum",
    "weight_decay", "warmup_epochs", "label_smoothing", "image_size", "limit", "augment", "sync_bn", "seed",
)


@dataclass
class PretrainConfig:
    """Everything that defines a pretraining run (stored in every checkpoint).

    Args:
        data: ``"fashion-mnist"``, an image folder (one sub-folder per class) or a
            ``.csv`` volume list; see :func:`napari_crossd.training.data.open_dataset`.
        out: output folder.
        arch: backbone, a plain name from :data:`napari_crossd.models.ARCHITECTURES`
            (``resnet18``, ``mobilenet_v2``, ...).
        conv: ``"crossd"`` (Cross-D Conv layers) or ``"plain"`` (nn.Conv2d).
        rotation: Cross-D rotation, ``"none"``, ``"static"`` or ``"dynamic"``.
        rotation_mode: ``"fourier"`` (exact rotation) or ``"reference"`` (the official computation).
        epochs: total number of epochs (the cosine schedule spans them).
        batch_size: total over all processes; each of N processes takes ``batch_size / N``.
            A data set smaller than one batch trains with the batch that fits (its images
            split evenly over the processes), one step per epoch.
        lr: peak learning rate.
        optimizer: ``"sgd"`` (momentum, Nesterov) or ``"adamw"``.
        momentum: SGD momentum.
        weight_decay: decoupled for AdamW, L2 for SGD; BatchNorm and bias parameters get none.
        warmup_epochs: linear warm-up before the cosine decay (fractions allowed).
        label_smoothing: cross-entropy label smoothing.
        image_size: image side (None: 28 for Fashion-MNIST, 64 otherwise).
        limit: Fashion-MNIST only: a class-stratified subset of this many training images.
        val: validation data (None: the Fashion-MNIST test split when training on
            Fashion-MNIST, else no validation).
        augment: random shift and horizontal flip.
        sync_bn: SyncBatchNorm across processes (statistics over the global batch; CUDA only).
        amp: mixed precision on CUDA (bfloat16 where supported, else float16 with loss scaling).
        workers: DataLoader worker processes per training process.
        seed: seed for initialisation, data order, augmentation and subset.
        device: ``"auto"`` (the local CUDA device under torchrun, else CUDA, else CPU) or ``"cpu"``.
        stop_after: leave after this many epochs of *this* run, as if interrupted
            (time-sliced clusters; tests); resume later with the same command and ``--resume``.
        keep: how many ``epoch_*.pt`` files to keep (the newest).
        print_every: print the running loss every this many steps (0: only per epoch).
        save_every_rank: also write each rank's final weights to ``rank<R>.safetensors``
            (to verify that the replicas agree).
        compile: run the training network through ``torch.compile`` (whole-step graph
            capture: fewer, fused kernel launches on CUDA). Off by default: on a CPU the
            compilation takes longer than short runs gain, and it needs a C++ compiler.
    """

    data: str
    out: str
    arch: str = "resnet18"
    conv: str = "crossd"
    rotation: str = "dynamic"
    rotation_mode: str = "fourier"
    epochs: int = 10
    batch_size: int = 128
    lr: float = 2e-3
    optimizer: str = "adamw"
    momentum: float = 0.9
    weight_decay: float = 0.05
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.0
    image_size: int | None = None
    limit: int | None = None
    val: str | None = None
    augment: bool = True
    sync_bn: bool = False
    amp: bool = True
    workers: int = 0
    seed: int = 0
    device: str = "auto"
    stop_after: int | None = None
    keep: int = 1
    print_every: int = 0
    save_every_rank: bool = False
    compile: bool = False

    def validate(self) -> None:
        """Raise ValueError naming the first setting that is out of range."""
        checks = [
            (self.arch in _BASE_ARCHS, f"arch must be one of {', '.join(_BASE_ARCHS)} (choose Cross-D with "
                                       f"conv='crossd'), got {self.arch!r}"),
            (self.conv in ("crossd", "plain"), f"conv must be 'crossd' or 'plain', got {self.conv!r}"),
            (self.rotation in ("none", "static", "dynamic"),
             f"rotation must be 'none', 'static' or 'dynamic', got {self.rotation!r}"),
            (self.rotation_mode in ("fourier", "reference"),
             f"rotation_mode must be 'fourier' or 'reference', got {self.rotation_mode!r}"),
            (self.epochs >= 1, f"epochs must be at least 1, got {self.epochs}"),
            (self.batch_size >= 1, f"batch_size must be at least 1, got {self.batch_size}"),
            (self.lr > 0, f"lr must be positive, got {self.lr}"),
            (self.optimizer in ("sgd", "adamw"), f"optimizer must be 'sgd' or 'adamw', got {self.optimizer!r}"),
            (self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}"),
            (self.warmup_epochs >= 0, f"warmup_epochs must be >= 0, got {self.warmup_epochs}"),
            (0 <= self.label_smoothing < 1, f"label_smoothing must be in [0, 1), got {self.label_smoothing}"),
            (self.workers >= 0, f"workers must be >= 0, got {self.workers}"),
            (self.device in ("auto", "cpu", "cuda"), f"device must be 'auto', 'cpu' or 'cuda', got {self.device!r}"),
            (self.stop_after is None or self.stop_after >= 1, f"stop_after must be >= 1, got {self.stop_after}"),
            (self.keep >= 1, f"keep must be >= 1, got {self.keep}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message + ".")

    @property
    def model_arch(self) -> str:
        """The registry name of the network: ``crossd_<arch>`` for Cross-D, else ``arch``."""
        return CROSSD_PREFIX + self.arch if self.conv == "crossd" else self.arch


# --------------------------------------------------------------------------- processes
@dataclass
class _Context:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def _init_processes(device: str) -> _Context:
    """Join the process group torchrun describes (if any) and pick this process's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device != "cpu" and torch.cuda.is_available()
    if device == "cuda" and not use_cuda:
        raise ValueError("device 'cuda' was requested but torch sees no CUDA device.")
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise ValueError(
                f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA devices: start at most "
                "that many processes per node (torchrun --nproc_per_node)."
            )
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        dist.init_process_group(backend, device_id=dev if use_cuda else None)
    return _Context(rank, world, local_rank, dev)


def _all_reduce(values: list[float], ctx: _Context, op=None) -> list[float]:
    if not ctx.distributed:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=ctx.device)
    dist.all_reduce(tensor, op=op or dist.ReduceOp.SUM)
    return tensor.tolist()


# --------------------------------------------------------------------------- RNG state as tensors
def _rng_state() -> dict[str, torch.Tensor]:
    """This process's RNG states as plain tensors (loadable with weights_only=True)."""
    # The legacy global numpy RNG is what user code and libraries draw from: save it as it is.
    _, keys, pos, has_gauss, cached = np.random.get_state()  # noqa: NPY002
    version, mt, gauss_next = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(keys.astype(np.int64)),
        "numpy_extra": torch.tensor([pos, has_gauss, cached], dtype=torch.float64),
        "python_mt": torch.tensor(mt, dtype=torch.int64),
        "python_extra": torch.tensor([version, math.nan if gauss_next is None else gauss_next], dtype=torch.float64),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch"])
    pos, has_gauss, cached = state["numpy_extra"].tolist()
    keys = state["numpy_keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, int(pos), int(has_gauss), cached))  # noqa: NPY002
    version, gauss_next = state["python_extra"].tolist()
    random.setstate((int(version), tuple(state["python_mt"].tolist()), None if math.isnan(gauss_next) else gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _gather_rng_states(ctx: _Context) -> dict[str, torch.Tensor]:
    """Every rank's RNG states stacked along a leading rank axis (collective: all ranks call it)."""
    mine = _rng_state()
    if not ctx.distributed:
        return {k: v[None] for k, v in mine.items()}
    gathered: list[dict] = [{} for _ in range(ctx.world)]
    dist.all_gather_object(gathered, mine)
    return {k: torch.stack([g[k] for g in gathered]) for k in mine}


# --------------------------------------------------------------------------- model, optimiser, schedule
def _build_model(config: PretrainConfig, num_classes: int) -> nn.Module:
    if config.conv == "crossd":
        if config.rotation == "none":
            warnings.warn(
                "rotation='none' trains only the central slice of each Cross-D kernel in 2D: the other slices "
                "get no gradient and stay at their initialisation.",
                stacklevel=3,
            )
        return build_model(config.model_arch, num_classes, rotation=config.rotation,
                           rotation_mode=config.rotation_mode)
    return build_model(config.model_arch, num_classes)


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    # No decay on BatchNorm affine parameters and biases (1-D tensors): decaying them only
    # fights the normalisation (the timm / torchvision-recipe convention).
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _make_optimizer(config: PretrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    groups = _param_groups(model, config.weight_decay)
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=config.momentum > 0)
    return torch.optim.AdamW(groups, lr=config.lr)


def _lr_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Linear warm-up to 1, then cosine decay to 0 at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


# --------------------------------------------------------------------------- checkpoints
def load_checkpoint(path: str | Path) -> dict:
    """Read a pretraining checkpoint safely (``weights_only=True``: tensors and plain containers only).

    Args:
        path: an ``epoch_NNNN.pt`` file, or the output folder (its newest checkpoint is taken).

    Returns:
        The checkpoint dict (``model``, ``optimizer``, ``scheduler``, ``scaler``, ``epoch``,
        ``step``, ``rng``, ``config``, ``meta``, ``history``, ``format``).

    Raises:
        FileNotFoundError: no checkpoint at ``path``.
        ValueError: the file is not a napari-crossd pretraining checkpoint.
    """
    path = Path(path)
    if path.is_dir():
        found = sorted(path.glob("epoch_*.pt"))
        if not found:
            raise FileNotFoundError(f"no epoch_*.pt checkpoint in {path}")
        path = found[-1]
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as err:
        raise ValueError(f"{path} is not a readable pretraining checkpoint: {err}") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(
            f"{path} is not a napari-crossd pretraining checkpoint (expected format {CHECKPOINT_FORMAT!r}); "
            "to start from pretrained weights instead, load them with napari_crossd.load_model."
        )
    return state


def _check_resume(saved: dict, config: PretrainConfig, ctx: _Context) -> None:
    different = [
        f"{name}: saved {saved[name]!r}, now {getattr(config, name)!r}"
        for name in _FIXED_ON_RESUME
        if saved.get(name) != getattr(config, name)
    ]
    if different:
        raise ValueError(
            "--resume needs the settings the checkpoint was trained with; these differ: " + "; ".join(different) + "."
        )


# --------------------------------------------------------------------------- loop
def _evaluate(model: nn.Module, dataset, mean: torch.Tensor, std: torch.Tensor, batch: int, ctx: _Context,
              autocast) -> tuple[float, float]:
    """Loss and accuracy on ``dataset``; each rank takes every world-th sample, results summed exactly."""
    indices = list(range(ctx.rank, len(dataset), ctx.world))
    loader = DataLoader(Subset(dataset, indices), batch_size=batch, shuffle=False)
    model.eval()
    total_loss = correct = count = 0.0
    with torch.no_grad():
        for images, targets in loader:
            images = (images.to(ctx.device) - mean) / std
            targets = targets.to(ctx.device)
            with autocast():
                logits = model(images)
            total_loss += float(F.cross_entropy(logits.float(), targets, reduction="sum"))
            correct += float((logits.argmax(1) == targets).sum())
            count += len(targets)
    total_loss, correct, count = _all_reduce([total_loss, correct, count], ctx)
    return total_loss / max(count, 1), correct / max(count, 1)


def _average_buffers(model: nn.Module, ctx: _Context) -> None:
    """Average floating-point buffers (BatchNorm running statistics) over the ranks.

    DDP keeps parameters identical, but each rank's running statistics follow its own
    batches after the last step. Averaging them (timm's ``distribute_bn``) uses every
    rank's data, and leaves every replica with the state that the checkpoint stores, so a
    resumed run starts from exactly what an uninterrupted one continues with.
    """
    if not ctx.distributed:
        return
    for buffer in model.buffers():
        if buffer.is_floating_point():
            dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
            buffer.div_(ctx.world)


def evaluate(model: nn.Module, data: str | Path = "fashion-mnist", split: str = "test", *,
             limit: int | None = None, batch_size: int = 256) -> float:
    """Top-1 accuracy of a 2D classifier on a data set, normalised as its ``crossd_meta`` says.

    Args:
        model: a 2D network from :func:`napari_crossd.load_model` (its ``normalization``
            and ``num_classes`` must fit ``data``).
        data: as for :func:`napari_crossd.training.data.open_dataset`.
        split: ``"test"`` (Fashion-MNIST) or ``"train"``.
        limit: a class-stratified subset of this many images (Fashion-MNIST).
        batch_size: images per forward pass.

    Returns:
        The fraction of images classified correctly.
    """
    meta = model.crossd_meta
    size = meta.training.image_size if meta.training else None
    dataset = open_dataset(data, split, image_size=size, limit=limit)
    norm = meta.normalization
    mean, std = torch.tensor(norm.mean).view(1, 3, 1, 1), torch.tensor(norm.std).view(1, 3, 1, 1)
    correct = 0
    model.eval()
    with torch.no_grad():
        for images, targets in DataLoader(dataset, batch_size=batch_size):
            correct += int((model((images - mean) / std).argmax(1) == targets).sum())
    return correct / len(dataset)


def _replica_difference(model: nn.Module, ctx: _Context) -> float:
    """Largest |rank r - rank 0| over every parameter and buffer (0.0 in one process)."""
    if not ctx.distributed:
        return 0.0
    largest = 0.0
    for tensor in model.state_dict().values():
        if not tensor.is_floating_point():
            continue
        reference = tensor.detach().clone()
        dist.broadcast(reference, src=0)
        largest = max(largest, float((tensor.detach() - reference).abs().max()) if tensor.numel() else 0.0)
    return _all_reduce([largest], ctx, op=dist.ReduceOp.MAX)[0]


def pretrain(config: PretrainConfig, resume: str | Path | None = None) -> list[dict]:
    """Train a 2D backbone on labelled images; see the module docstring for launching and outputs.

    Args:
        config: the run's settings.
        resume: a checkpoint (or output folder) to continue from; the model, optimiser,
            scheduler, scaler, epoch, step and every rank's RNG state are restored.

    Returns:
        The per-epoch log entries of the whole run (including those before a resume).

    Raises:
        ValueError: invalid settings, a batch size not divisible by the number of
            processes, or a checkpoint saved with different settings.
    """
    config.validate()
    ctx = _init_processes(config.device)
    try:
        return _train(config, resume, ctx)
    finally:
        if ctx.distributed and dist.is_initialized():
            dist.destroy_process_group()


def _train(config: PretrainConfig, resume, ctx: _Context) -> list[dict]:
    """The run: data, model and optimiser (or a checkpoint's), then one epoch after another."""
    _check_processes(config, ctx)
    saved = load_checkpoint(resume) if resume is not None else None
    if saved is not None:
        _check_resume(saved["config"], config, ctx)
    data = _open_data(config, ctx, saved)
    run = _build_run(config, ctx, data)
    start_epoch, step, history = _restore(run, saved, config, ctx) if saved is not None else _fresh(config, ctx)
    net = DistributedDataParallel(run.model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None) \
        if ctx.distributed else run.model
    if config.compile:
        net = torch.compile(net, dynamic=False)  # fixed shapes: one graph per layer geometry
    sampler = DistributedSampler(data.train, num_replicas=ctx.world, rank=ctx.rank, shuffle=True,
                                 seed=config.seed, drop_last=True)
    loader = DataLoader(data.train, batch_size=data.per_rank, sampler=sampler, num_workers=config.workers,
                        drop_last=True, pin_memory=ctx.device.type == "cuda")
    out = Path(config.out)
    if ctx.main:
        out.mkdir(parents=True, exist_ok=True)
        parameters = sum(p.numel() for p in run.model.parameters())
        print(f"{config.model_arch}: {parameters:,} parameters; {len(data.train)} training images in "
              f"{len(data.train.classes)} classes, {data.steps_per_epoch} steps/epoch on {ctx.world} process(es) "
              f"({ctx.device.type}, batch {data.per_rank} each)", flush=True)

    epochs_this_run = 0
    for epoch in range(start_epoch, config.epochs):
        started = time.perf_counter()
        sampler.set_epoch(epoch)
        data.train.set_epoch(epoch)
        entry, step = _train_epoch(net, loader, run, data, config, ctx, step)
        _average_buffers(run.model, ctx)
        entry = {"epoch": epoch + 1, "step": step, **entry, "lr": run.scheduler.get_last_lr()[0]}
        if data.val is not None:
            entry["val_loss"], entry["val_accuracy"] = _evaluate(run.model, data.val, data.mean, data.std,
                                                                 data.per_rank * 2, ctx, run.autocast)
        entry["replica_max_abs_diff"] = _replica_difference(run.model, ctx)
        entry["seconds"] = round(time.perf_counter() - started, 2)
        entry["processes"] = ctx.world
        history.append(entry)
        rng = _gather_rng_states(ctx)  # collective: every rank takes part
        if ctx.main:
            _save_epoch(run, data, config, entry, history, rng, out)
        if ctx.distributed:
            dist.barrier()
        epochs_this_run += 1
        if config.stop_after is not None and epochs_this_run >= config.stop_after and epoch + 1 < config.epochs:
            if ctx.main:
                print(f"stopping after {epochs_this_run} epoch(s) as asked; continue with --resume {out}", flush=True)
            break

    if config.save_every_rank:
        _save_weights(run.model, replace(run.meta, normalization=data.normalization),
                      out / f"rank{ctx.rank}.safetensors")
    return history


def _check_processes(config: PretrainConfig, ctx: _Context) -> None:
    if config.batch_size % ctx.world:
        raise ValueError(
            f"batch_size {config.batch_size} is the total over {ctx.world} processes and must divide evenly by it."
        )
    if config.sync_bn and ctx.distributed and ctx.device.type != "cuda":
        raise ValueError("--sync-bn needs CUDA devices (torch's SyncBatchNorm runs on GPUs only); "
                         "drop it for CPU training, where each process keeps its own batch statistics.")


@dataclass
class _Data:
    """The training (and validation) images, how they are batched, and their normalisation."""

    train: object
    val: object | None
    per_rank: int
    steps_per_epoch: int
    normalization: Normalization
    mean: torch.Tensor
    std: torch.Tensor


def _open_data(config: PretrainConfig, ctx: _Context, saved: dict | None) -> _Data:
    train_set = open_dataset(config.data, "train", image_size=config.image_size, augment=config.augment,
                             seed=config.seed, limit=config.limit)
    val_set = None
    if config.val is not None:
        val_set = open_dataset(config.val, "train", image_size=train_set.image_size)
    elif str(config.data) == "fashion-mnist" or (Path(config.data).is_dir() and
                                                  any(Path(config.data).glob("t10k-images-idx3-ubyte*"))):
        val_set = open_dataset(config.data, "test", image_size=train_set.image_size)
    if val_set is not None and list(val_set.classes) != list(train_set.classes):
        raise ValueError(f"validation classes {val_set.classes} differ from training classes {train_set.classes}.")
    per_rank = _batch_per_rank(len(train_set), config.batch_size, ctx)
    if saved is not None:
        normalization = ModelMeta.from_dict(saved["meta"]).normalization
    else:
        mean, std = train_set.mean_std()
        normalization = Normalization(f"pretrain:{Path(str(config.data)).name}", mean=(mean,) * 3, std=(std,) * 3)
    mean = torch.tensor(normalization.mean, device=ctx.device).view(1, 3, 1, 1)
    std = torch.tensor(normalization.std, device=ctx.device).view(1, 3, 1, 1)
    steps_per_epoch = len(train_set) // (per_rank * ctx.world)
    return _Data(train_set, val_set, per_rank, steps_per_epoch, normalization, mean, std)


def _batch_per_rank(images: int, batch_size: int, ctx: _Context) -> int:
    """``batch_size / world``, or for a set smaller than one batch, all of it in one step per epoch."""
    if images >= batch_size:
        return batch_size // ctx.world
    if images < ctx.world:
        raise ValueError(f"{images} training images are fewer than the {ctx.world} processes: each needs one.")
    per_rank = images // ctx.world
    if ctx.main:
        print(f"{images} training images are fewer than one batch of {batch_size}: training with batch "
              f"{per_rank * ctx.world} ({per_rank} per process), one step per epoch.", flush=True)
    return per_rank


@dataclass
class _Run:
    """What a step needs beyond the data: the model and how it is optimised."""

    model: nn.Module
    meta: ModelMeta
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    criterion: nn.Module
    amp_dtype: torch.dtype
    use_amp: bool
    device_type: str

    def autocast(self):
        return torch.autocast(self.device_type, dtype=self.amp_dtype, enabled=self.use_amp)


def _build_run(config: PretrainConfig, ctx: _Context, data: _Data) -> _Run:
    # Same seed on every rank: identical initial weights (DDP would broadcast rank 0's anyway).
    torch.manual_seed(config.seed)
    model = _build_model(config, len(data.train.classes))
    meta = model.crossd_meta
    if config.sync_bn and ctx.distributed:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(ctx.device)
    optimizer = _make_optimizer(config, model)
    total_steps = data.steps_per_epoch * config.epochs
    warmup_steps = round(config.warmup_epochs * data.steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: _lr_factor(step, warmup_steps, total_steps)
    )
    use_amp = config.amp and ctx.device.type == "cuda"
    amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=use_amp and amp_dtype == torch.float16)
    criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    return _Run(model, meta, optimizer, scheduler, scaler, criterion, amp_dtype, use_amp, ctx.device.type)


def _fresh(config: PretrainConfig, ctx: _Context) -> tuple[int, int, list[dict]]:
    """Seed a new run: different dropout masks per rank, reproducibly. Returns epoch, step, history."""
    torch.manual_seed(config.seed + ctx.rank)
    np.random.seed(config.seed + ctx.rank)  # noqa: NPY002
    random.seed(config.seed + ctx.rank)
    return 0, 0, []


def _restore(run: _Run, saved: dict, config: PretrainConfig, ctx: _Context) -> tuple[int, int, list[dict]]:
    """Load a checkpoint's states and this rank's RNG streams. Returns epoch, step, history."""
    run.model.load_state_dict(saved["model"])
    run.optimizer.load_state_dict(saved["optimizer"])
    run.scheduler.load_state_dict(saved["scheduler"])
    run.scaler.load_state_dict(saved["scaler"])
    start_epoch, step, history = int(saved["epoch"]), int(saved["step"]), list(saved["history"])
    rng = saved["rng"]
    if rng["torch"].shape[0] == ctx.world:
        # clone(): torch.set_rng_state reads a row view from the start of its storage.
        _set_rng_state({k: v[ctx.rank].clone() for k, v in rng.items()})
    else:
        # Another world size: data order and augmentation are still reproducible, the
        # per-rank RNG streams (dropout) cannot be mapped; reseed them deterministically.
        warnings.warn(
            f"checkpoint was saved by {rng['torch'].shape[0]} processes, resuming with {ctx.world}: "
            "the run continues correctly but will not match an uninterrupted one bit for bit.",
            stacklevel=3,
        )
        torch.manual_seed(config.seed + 7919 * start_epoch + ctx.rank)
    if ctx.main:
        print(f"resumed from epoch {start_epoch} (step {step})", flush=True)
    return start_epoch, step, history


def _train_epoch(net: nn.Module, loader: DataLoader, run: _Run, data: _Data, config: PretrainConfig,
                 ctx: _Context, step: int) -> tuple[dict, int]:
    """One pass over this rank's batches. Returns the epoch's loss and accuracy (all ranks) and the step."""
    net.train()
    total_steps = data.steps_per_epoch * config.epochs
    loss_sum = correct = count = 0.0
    for i, (images, targets) in enumerate(loader):
        if i >= data.steps_per_epoch:
            break
        images = (images.to(ctx.device, non_blocking=True) - data.mean) / data.std
        targets = targets.to(ctx.device, non_blocking=True)
        with run.autocast():
            logits = net(images)
            loss = run.criterion(logits.float(), targets)
        run.optimizer.zero_grad(set_to_none=True)
        run.scaler.scale(loss).backward()
        run.scaler.step(run.optimizer)
        run.scaler.update()
        run.scheduler.step()
        step += 1
        loss_sum += float(loss.detach()) * len(targets)
        correct += float((logits.detach().argmax(1) == targets).sum())
        count += len(targets)
        if ctx.main and config.print_every and step % config.print_every == 0:
            print(f"  step {step}/{total_steps}  loss {loss_sum / count:.4f}  "
                  f"lr {run.scheduler.get_last_lr()[0]:.2e}", flush=True)
    loss_sum, correct, count = _all_reduce([loss_sum, correct, count], ctx)
    return {"train_loss": loss_sum / count, "train_accuracy": correct / count}, step


def _save_epoch(run: _Run, data: _Data, config: PretrainConfig, entry: dict, history: list[dict],
                rng: dict[str, torch.Tensor], out: Path) -> None:
    """Rank 0 after an epoch: the checkpoint, the latest weights, the log line and the summary."""
    epoch = entry["epoch"]
    training = TrainingRecord(str(config.data), epoch, config.epochs, image_size=data.train.image_size,
                              **{k: v for k, v in entry.items() if k.endswith("accuracy")})
    meta = replace(run.meta, normalization=data.normalization, class_names=tuple(data.train.classes),
                   training=training)
    state = {
        "format": CHECKPOINT_FORMAT,
        "model": {k: v.detach().cpu() for k, v in run.model.state_dict().items()},
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "scaler": run.scaler.state_dict(),
        "epoch": epoch,
        "step": entry["step"],
        "rng": rng,
        "config": asdict(config),
        "meta": meta.to_dict(),
        "history": history,
    }
    with atomic_path(out / f"epoch_{epoch:04d}.pt") as partial:
        torch.save(state, partial)
    for old in sorted(out.glob("epoch_*.pt"))[: -config.keep]:
        old.unlink()
    _save_weights(run.model, meta, out / "model.safetensors")
    with (out / "log.jsonl").open("a") as f:
        f.write(json.dumps(entry) + "\n")
    val = f"  val loss {entry['val_loss']:.4f} acc {100 * entry['val_accuracy']:.2f}%" if "val_loss" in entry else ""
    print(f"epoch {epoch}/{config.epochs}  train loss {entry['train_loss']:.4f} "
          f"acc {100 * entry['train_accuracy']:.2f}%{val}  lr {entry['lr']:.2e}  "
          f"{entry['seconds']:.0f} s", flush=True)


def _save_weights(model: nn.Module, meta: ModelMeta, path: Path) -> None:
    # save_model reads crossd_meta; SyncBatchNorm conversion keeps the module and its attribute.
    model.crossd_meta = meta
    save_model(model, path)


# --------------------------------------------------------------------------- command line
def add_pretrain_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``crossd pretrain`` arguments to ``parser`` (defaults from :class:`PretrainConfig`)."""
    d = {f.name: f.default for f in fields(PretrainConfig)}
    parser.add_argument("data", help="'fashion-mnist' (apt-get install dataset-fashion-mnist), an image folder "
                                     "with one sub-folder per class (PNG/JPEG/TIFF/2D NIfTI), or a .csv "
                                     "volume list with columns path,label (slices inherit the volume's label)")
    parser.add_argument("--arch", default=d["arch"], choices=_BASE_ARCHS, help="backbone (default: %(default)s)")
    parser.add_argument("--conv", default=d["conv"], choices=("crossd", "plain"),
                        help="Cross-D Conv layers or plain nn.Conv2d (default: %(default)s)")
    parser.add_argument("--rotation", default=d["rotation"], choices=("none", "static", "dynamic"),
                        help="Cross-D rotation (default: %(default)s)")
    parser.add_argument("--rotation-mode", default=d["rotation_mode"], choices=("fourier", "reference"),
                        help="exact Fourier rotation or the official computation (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=d["epochs"], help="total epochs (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=d["batch_size"],
                        help="total batch over all processes (default: %(default)s; a smaller data set "
                             "trains with the batch that fits, one step per epoch)")
    parser.add_argument("--lr", type=float, default=d["lr"], help="peak learning rate (default: %(default)s)")
    parser.add_argument("--optimizer", default=d["optimizer"], choices=("sgd", "adamw"),
                        help="(default: %(default)s)")
    parser.add_argument("--momentum", type=float, default=d["momentum"], help="SGD momentum (default: %(default)s)")
    parser.add_argument("--weight-decay", type=float, default=d["weight_decay"], help="(default: %(default)s)")
    parser.add_argument("--warmup-epochs", type=float, default=d["warmup_epochs"],
                        help="linear warm-up before cosine decay (default: %(default)s)")
    parser.add_argument("--label-smoothing", type=float, default=d["label_smoothing"], help="(default: %(default)s)")
    parser.add_argument("--image-size", type=int, default=None,
                        help="image side (default: 28 for Fashion-MNIST, 64 otherwise)")
    parser.add_argument("--limit", type=int, default=None,
                        help="Fashion-MNIST: train on a class-stratified subset of this many images")
    parser.add_argument("--val", default=None, help="validation image folder (default: the Fashion-MNIST test "
                                                    "split when training on Fashion-MNIST)")
    parser.add_argument("--no-augment", dest="augment", action="store_false", help="no random shift/flip")
    parser.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm across processes")
    parser.add_argument("--no-amp", dest="amp", action="store_false", help="full precision on CUDA")
    parser.add_argument("--workers", type=int, default=d["workers"],
                        help="DataLoader workers per process (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=d["seed"], help="(default: %(default)s)")
    parser.add_argument("--device", default=d["device"], choices=("auto", "cpu", "cuda"),
                        help="(default: %(default)s: the local CUDA device if any)")
    parser.add_argument("--out", type=Path, required=True,
                        help="output folder: epoch_NNNN.pt, model.safetensors + model.json, log.jsonl")
    parser.add_argument("--resume", default=None, metavar="CKPT",
                        help="continue exactly from a checkpoint (or the newest in a folder)")
    parser.add_argument("--stop-after", type=int, default=None, metavar="N",
                        help="leave after N epochs of this run, as if interrupted (resume later)")
    parser.add_argument("--keep", type=int, default=d["keep"], help="epoch checkpoints kept (default: %(default)s)")
    parser.add_argument("--print-every", type=int, default=d["print_every"], metavar="STEPS",
                        help="print the running loss every STEPS steps (default: per epoch only)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the training network (for CUDA; off by default)")
    parser.add_argument("--save-every-rank", action="store_true",
                        help="also write each rank's final weights (rank<R>.safetensors) to verify replicas")
    return parser


def run_pretrain(args: argparse.Namespace) -> list[dict]:
    """Run :func:`pretrain` from parsed ``crossd pretrain`` arguments."""
    names = {f.name for f in fields(PretrainConfig)}
    values = {k: v for k, v in vars(args).items() if k in names}
    values["data"], values["out"] = str(values["data"]), str(values["out"])
    return pretrain(PretrainConfig(**values), resume=args.resume)


if __name__ == "__main__":
    parser = add_pretrain_arguments(argparse.ArgumentParser(prog="python -m napari_crossd.training.loop"))
    run_pretrain(parser.parse_args())
    sys.exit(0)

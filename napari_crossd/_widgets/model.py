"""Model widget: 2D weights in, an inflated 3D network out, shared with the other widgets."""

from __future__ import annotations

import gc
from pathlib import Path

from magicgui.widgets import ComboBox, Container, FileEdit, Label, PushButton
from qtpy.QtWidgets import QSizePolicy

from ._jobs import JobRunner
from ._session import session_for

__all__ = ["ModelWidget", "load_job"]


def load_job(checkpoint: str, arch: str, strategy: str, official_shift: str = "keep"):
    """Generator: load a checkpoint, inflate it, describe it. Returns (model2d, model3d, info)."""
    # torch on first use: npe2 imports the widget modules before any model is loaded
    from napari_crossd.engine import Progress, prepare_model
    from napari_crossd.io import load_model_with_report

    source = checkpoint or "default"
    yield Progress(0, 3, f"reading {Path(source).name if source != 'default' else 'default weights'}")
    try:
        loaded, report = load_model_with_report(source, arch=arch)
    except ValueError as err:
        raise ValueError(f"{Path(source).name}: {err}") from None
    meta = loaded.crossd_meta
    three_d = meta.spatial_dims == 3
    yield Progress(1, 3, "already 3D" if three_d else f"inflating ({strategy})")
    model3d = prepare_model(loaded, strategy=strategy, official_shift=official_shift)
    info = {
        "source": "default (napari-crossd Cross-D MobileNetV2)" if source == "default" else str(source),
        "arch": meta.arch,
        "format": meta.format,
        "parameters": sum(p.numel() for p in model3d.parameters()),
        "strategy": model3d.crossd_meta.strategy or strategy,
        "loading": report.summary(),
        "normalization": meta.normalization.name if meta.normalization else None,
    }
    yield Progress(3, 3, "ready")
    return (None if three_d else loaded), model3d, info


def describe(info: dict) -> str:
    return (
        f"{info['arch']} ({info['format']} weights) from {info['source']}\n"
        f"{info['parameters']:,} parameters in 3D, strategy {info['strategy']}\n"
        f"{info['loading']}; input normalisation {info['normalization']}"
    )


class ModelWidget(Container):
    """Choose 2D weights (file or the bundled default), architecture, inflation strategy and device."""

    def __init__(self, napari_viewer) -> None:
        # torch on first use: npe2 imports the widget modules before any model is loaded
        from napari_crossd.engine.devices import DEVICES
        from napari_crossd.models import ARCHITECTURES
        from napari_crossd.models.inflate import STRATEGIES

        self.viewer = napari_viewer
        self.session, self.events = session_for(napari_viewer)
        self.checkpoint = FileEdit(label="checkpoint", mode="r", filter="*.pth *.pt *.ckpt *.safetensors",
                                   tooltip="2D weights; leave empty for the bundled Cross-D MobileNetV2")
        self.arch = ComboBox(label="architecture", choices=("auto", *ARCHITECTURES), value="auto")
        self.strategy = ComboBox(label="inflation", choices=STRATEGIES, value="i3d")
        self.device = ComboBox(label="device", choices=DEVICES, value="auto")
        self.load_button = PushButton(text="Load and inflate")
        self.status = Label(value="no model loaded")
        # Wrapped and free to shrink: the model's description must not widen the dock (and shrink the canvas).
        self.status.native.setWordWrap(True)
        self.status.native.setSizePolicy(QSizePolicy.Policy.Preferred, QSizePolicy.Policy.Preferred)
        self.runner = JobRunner(on_busy=lambda busy: setattr(self.load_button, "enabled", not busy))
        super().__init__(widgets=[self.checkpoint, self.arch, self.strategy, self.device,
                                  self.load_button, self.runner.progress, self.status])
        self.load_button.changed.connect(self.load)
        self.device.changed.connect(self._set_device)

    def _set_device(self, value: str) -> None:
        # torch on first use: npe2 imports the widget modules before any model is loaded
        from napari_crossd.engine import resolve_device

        try:
            resolve_device(value)
        except ValueError as err:
            self.runner.fail(str(err))
            self.device.value = "auto"
            return
        self.session.device = value

    def load(self, _=None):
        path = str(self.checkpoint.value) if self.checkpoint.value else ""
        if path in ("", "."):
            path = ""
        elif not Path(path).is_file():
            self.runner.fail(f"checkpoint {path} is not a file")
            return None
        self.status.value = "loading ..."
        arch, strategy = self.arch.value, self.strategy.value

        def done(result) -> None:
            model2d, model3d, info = result
            self.session.model2d, self.session.model3d, self.session.info = model2d, model3d, info
            self.session.segmenter = None
            self.session.device = self.device.value
            self.status.value = describe(info)
            self.events.model_changed.emit(model3d)
            # Everything alive now (napari, Qt, torch, the model: ~600k objects) leaves the cyclic
            # collector's sight; refcounting still frees it. A full collection, which napari runs for
            # every layer removed, then takes ~0 ms instead of ~280 ms of GUI-thread stall.
            gc.freeze()

        return self.runner.start(lambda: load_job(path, arch, strategy), done, "Load model",
                                 on_error=lambda _err: setattr(self.status, "value", self._status_after_error()))

    def _status_after_error(self) -> str:
        if self.session.model3d is None:
            return "no model loaded"
        return describe(self.session.info)

"""What the dock widgets of one viewer share: the loaded model and the segmenter trained on it."""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

from psygnal import Signal

from ._common import volume_data

__all__ = ["Session", "session_for"]


@dataclass
class Session:
    """The model state of one viewer, shared by its Cross-D widgets.

    Attributes:
        model2d: the 2D network as loaded (None for a saved 3D network); the inspector
            reads learned rotations from its Cross-D layers.
        model3d: the inflated 3D network the Run and Fine-tune widgets use.
        device: the device choice (``"auto"``, ``"cpu"``, ...).
        info: what was loaded (architecture, parameters, strategy, keys), for display.
        segmenter: the segmentation model trained or loaded for ``model3d``, or None.
        features: the voxel features of each image trained on or predicted, by
            ``id`` of its data (:class:`napari_crossd.engine.VolumeFeatures`, which holds
            the data, so the id stays its own): kept so that retraining after more strokes,
            and predicting, do not compute them again. Replaced when the image, its spacing
            or the segmenter's encoder or features change; dropped with the image's layer.
    """

    model2d: object = None
    model3d: object = None
    device: str = "auto"
    info: dict = field(default_factory=dict)
    segmenter: object = None
    features: dict = field(default_factory=dict)

    def features_for(self, segmenter, volume, spacing):
        """The cached features of ``volume`` for ``segmenter``, or new ones (then cached)."""
        cached = self.features.get(id(volume))
        self.features[id(volume)] = segmenter.features(volume, cached=cached, spacing=spacing)
        return self.features[id(volume)]

    def forget_features(self, volume) -> None:
        """Drop the cached features of ``volume`` (its layer was removed)."""
        self.features.pop(id(volume), None)

    def require_model(self):
        """The 3D network, or a ValueError telling the user to load one."""
        if self.model3d is None:
            raise ValueError("no model loaded: load weights in the Cross-D Model widget first")
        return self.model3d


class _Events:
    # psygnal signals live on a class; one instance per session.
    model_changed = Signal(object)
    segmenter_changed = Signal(object)


_SESSIONS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def session_for(viewer) -> tuple[Session, _Events]:
    """The session of ``viewer`` (created on first use, dropped with the viewer)."""
    if viewer not in _SESSIONS:
        session = Session()
        viewer.layers.events.removed.connect(lambda event: session.forget_features(volume_data(event.value)))
        _SESSIONS[viewer] = (session, _Events())
    return _SESSIONS[viewer]

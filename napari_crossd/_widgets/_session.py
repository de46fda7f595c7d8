"""What the dock widgets of one viewer share: the loaded model and the segmenter trained on it."""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

from psygnal import Signal

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
        features: the voxel features of the image last trained on or predicted
            (:class:`napari_crossd.engine.VolumeFeatures`): kept so that retraining after
            more strokes, and predicting, do not compute them again. Replaced when the
            image, its spacing or the segmenter's encoder or features change.
    """

    model2d: object = None
    model3d: object = None
    device: str = "auto"
    info: dict = field(default_factory=dict)
    segmenter: object = None
    features: object = None

    def features_for(self, segmenter, volume, spacing):
        """The cached features of ``volume`` for ``segmenter``, or new ones (then cached)."""
        cached = self.features
        if cached is None or not cached.serves(volume, segmenter.encoder, segmenter.spec, spacing, None):
            self.features = segmenter.features(volume, spacing=spacing)
        return self.features

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
        _SESSIONS[viewer] = (Session(), _Events())
    return _SESSIONS[viewer]

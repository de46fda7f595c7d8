"""The napari dock widgets of napari-crossd (Qt/magicgui; numerics live in napari_crossd.engine)."""

from ._session import Session, session_for
from .finetune import FinetuneWidget
from .inspector import InspectorWidget
from .model import ModelWidget
from .run import RunWidget

__all__ = ["FinetuneWidget", "InspectorWidget", "ModelWidget", "RunWidget", "Session", "session_for"]

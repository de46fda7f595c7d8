"""A tiny line / bar plot drawn with QPainter (no plotting library needed)."""

from __future__ import annotations

import math

from qtpy.QtCore import QPointF, QRectF, Qt
from qtpy.QtGui import QColor, QPainter, QPen, QPolygonF
from qtpy.QtWidgets import QSizePolicy, QWidget

__all__ = ["CurvePlot"]


class CurvePlot(QWidget):
    """Values drawn as a polyline (``bars=False``) or a histogram (``bars=True``) with their range.

    ``labels``: (left, right) or (left, centre, right) texts under the x axis; a histogram
    also shows its largest count at the top of the y axis (``y_label`` names the counts).
    """

    def __init__(self, title: str, *, bars: bool = False, parent=None) -> None:
        super().__init__(parent)
        self.title = title
        self.bars = bars
        self.values: list[float] = []
        self.labels: tuple[str, ...] = ("", "")
        self.y_label = "count"
        self.setMinimumHeight(110)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)

    def set_values(self, values, labels: tuple[str, ...] = ("", "")) -> None:
        self.values = [float(v) for v in values]
        self.labels = labels
        self.update()

    def append(self, value: float) -> None:
        self.values.append(float(value))
        self.update()

    def clear(self) -> None:
        self.values = []
        self.update()

    def paintEvent(self, event) -> None:
        painter = QPainter(self)
        painter.setRenderHint(QPainter.RenderHint.Antialiasing)
        rect = QRectF(self.rect()).adjusted(6, 18, -6, -16)
        painter.fillRect(self.rect(), QColor(38, 41, 48))
        painter.setPen(QColor(200, 200, 200))
        values = [v for v in self.values if math.isfinite(v)]
        last = f"  last {values[-1]:.4g}" if values and not self.bars else ""
        painter.drawText(6, 13, f"{self.title}{last}")
        painter.drawText(QRectF(rect.left(), rect.bottom() + 2, rect.width(), 14),
                         int(Qt.AlignmentFlag.AlignLeft), self.labels[0])
        painter.drawText(QRectF(rect.left(), rect.bottom() + 2, rect.width(), 14),
                         int(Qt.AlignmentFlag.AlignRight), self.labels[-1])
        if len(self.labels) == 3:
            painter.drawText(QRectF(rect.left(), rect.bottom() + 2, rect.width(), 14),
                             int(Qt.AlignmentFlag.AlignHCenter), self.labels[1])
        if not values:
            painter.end()
            return
        low, high = (0.0, max(values)) if self.bars else (min(values), max(values))
        span = (high - low) or 1.0
        painter.setPen(QPen(QColor(90, 90, 90), 1))
        painter.drawRect(rect)
        n = len(values)
        if self.bars:
            width = rect.width() / n
            painter.setBrush(QColor(102, 178, 255))
            painter.setPen(Qt.PenStyle.NoPen)
            for i, v in enumerate(values):
                h = rect.height() * (v - low) / span
                painter.drawRect(QRectF(rect.left() + i * width, rect.bottom() - h, max(width - 1, 1), h))
            painter.setPen(QColor(200, 200, 200))
            painter.drawText(QRectF(rect.left() + 4, rect.top(), rect.width() - 8, 14),
                             int(Qt.AlignmentFlag.AlignLeft), f"{high:.0f} {self.y_label}")
        else:
            points = QPolygonF([
                QPointF(rect.left() + rect.width() * (i / max(n - 1, 1)),
                        rect.bottom() - rect.height() * (v - low) / span)
                for i, v in enumerate(values)
            ])
            painter.setPen(QPen(QColor(255, 170, 60), 2))
            painter.drawPolyline(points)
            painter.setPen(QColor(200, 200, 200))
            painter.drawText(QRectF(rect.left(), rect.top(), rect.width() - 4, 14),
                             int(Qt.AlignmentFlag.AlignRight), f"{high:.3g}")
            painter.drawText(QRectF(rect.left(), rect.bottom() - 14, rect.width() - 4, 14),
                             int(Qt.AlignmentFlag.AlignRight), f"{low:.3g}")
        painter.end()

"""Headless figures written atomically as PNG (LUT staircases, verify scatter, demo report)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from .fsio import atomic_write_bytes


def subplots(**kwargs: Any) -> tuple[Any, Any]:
    """``plt.subplots`` on the Agg backend: plots are made on machines with no display."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    return plt.subplots(**kwargs)


def save_png(fig: Any, path: str | Path, **kwargs: Any) -> Path:
    """Lay out, render and close ``fig``; the PNG replaces ``path`` atomically."""
    from matplotlib import pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", **kwargs)
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())

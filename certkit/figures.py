"""Matplotlib, headless, and figures saved the way every certkit file is: atomically, in the format the
suffix names, with one-line errors for a format or a path that cannot be written."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

from certkit.errors import CertkitError
from certkit.fileio import atomic_write_bytes


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend: plots never need a display (SSH, SLURM, CI)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str | os.PathLike) -> Path:
    """Write ``fig`` to ``path`` (.png, .pdf, .svg, ... whatever the canvas supports) and close it."""
    path = Path(path)
    fmt = path.suffix[1:].lower() or "png"
    buf = io.BytesIO()
    try:
        if fmt not in fig.canvas.get_supported_filetypes():
            raise CertkitError(f"{path}: cannot plot to a .{fmt} file; use .png, .pdf or .svg")
        fig.savefig(buf, format=fmt, dpi=150, bbox_inches="tight")
    finally:
        pyplot().close(fig)
    try:
        atomic_write_bytes(path, buf.getvalue())
    except OSError as e:
        raise CertkitError(f"{path}: cannot write the plot ({e.strerror or e})") from None
    return path

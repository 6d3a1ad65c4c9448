"""Figure titles that fit their figure."""

from __future__ import annotations

import textwrap
from typing import Any

# Characters of a title per inch of figure width at 12 pt (a 10 pt title fits 1.2 times as
# many).
CHARS_PER_INCH_12PT = 11


def fitted_suptitle(fig: Any, title: str, fontsize: float = 12) -> None:
    """``title`` over ``fig``, wrapped to the figure's width, so no side of it is cut off.
    Lay the figure out afterwards (``tight_layout`` or the constrained engine)."""
    per_inch = CHARS_PER_INCH_12PT * 12 / fontsize
    fig.suptitle(textwrap.fill(title, width=int(fig.get_figwidth() * per_inch)), fontsize=fontsize)

"""The progress bar of long work in the command line: a percentage, a bar, and what is happening now."""

from __future__ import annotations

import sys
from typing import Any

from tqdm import tqdm


class StatusBar(tqdm):  # type: ignore[misc]  # tqdm has no type stubs here
    """``state:  40%|████      | full fine-tuning, fold 1 of 3: step 85/160``.

    The status is tqdm's postfix without the ", " that tqdm puts before a postfix (made for a postfix
    after its counters, not on its own after the bar).
    """

    def __init__(self, disable: bool) -> None:
        super().__init__(total=100, unit="%", disable=disable, file=sys.stderr, bar_format="{l_bar}{bar}| {status}")

    @property
    def format_dict(self) -> dict[str, Any]:
        return {**super().format_dict, "status": self.postfix or ""}

    def show(self, state: str, status: str, fraction: float) -> None:
        self.set_description_str(state, refresh=False)
        self.set_postfix_str(status[:100], refresh=False)
        self.n = round(fraction * 100)
        self.refresh()

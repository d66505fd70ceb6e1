"""A dependency (Triton, the job queue) that comes and goes: logged once when it goes, once when it is back.

Callers poll it many times a second while it is away; one line per change of state is what an
operator needs, not one per attempt.
"""

from __future__ import annotations

import logging


class Reachability:
    def __init__(self, log: logging.Logger, up: bool = True) -> None:
        self.log = log
        self.up = up

    def down(self, message: str) -> None:
        """It failed: warn with ``message`` if it was up."""
        if self.up:
            self.log.warning("%s", message)
        self.up = False

    def back(self, message: str) -> None:
        """It answered: say ``message`` if it was down."""
        if not self.up:
            self.log.info("%s", message)
        self.up = True

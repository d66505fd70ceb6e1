"""A dependency that comes and goes is logged once per change, not once per attempt."""

from __future__ import annotations

import logging

from prelabel.reachability import Reachability


def test_one_line_when_it_goes_and_one_when_it_is_back(caplog):
    caplog.set_level(logging.INFO)
    queue = Reachability(logging.getLogger("test"))
    queue.back("back")  # up already: nothing to say
    for attempt in range(5):
        queue.down(f"gone {attempt}")
    queue.back("back")
    queue.back("back")
    assert [r.getMessage() for r in caplog.records] == ["gone 0", "back"]
    assert [r.levelname for r in caplog.records] == ["WARNING", "INFO"] and queue.up
    starts_down = Reachability(logging.getLogger("test"), up=False)
    starts_down.back("reachable")
    assert caplog.records[-1].getMessage() == "reachable" and starts_down.up

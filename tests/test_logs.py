"""Progress lines through logging: what the CLI prints and what an operator collects."""

import logging
import threading

from fiftyone_nola.logs import LOGGER, lines_to


def test_lines_to_sends_info_lines_and_restores_the_level():
    pkg, stage = logging.getLogger(LOGGER), logging.getLogger(f"{LOGGER}.stages.demo")
    before = pkg.level
    out = []
    with lines_to(out.append, below=logging.WARNING):
        assert pkg.getEffectiveLevel() <= logging.INFO
        stage.info("[demo] 3 samples -> 'field'")
        stage.warning("a warning goes to the warning handlers, not here")
        stage.debug("not at INFO")
    stage.info("after the block: not collected")
    assert out == ["[demo] 3 samples -> 'field'"]
    assert pkg.level == before


def test_this_thread_collects_only_its_own_lines():
    stage = logging.getLogger(f"{LOGGER}.stages.demo")
    mine, other_done = [], threading.Event()

    def other():
        stage.info("another operator's line")
        other_done.set()

    with lines_to(mine.append, this_thread=True):
        t = threading.Thread(target=other)
        t.start()
        other_done.wait(5)
        t.join(5)
        stage.info("my line")
    assert mine == ["my line"]

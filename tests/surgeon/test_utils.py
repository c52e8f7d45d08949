"""surgeon.utils: the phase logger of long shots."""

import pytest

pytestmark = pytest.mark.unit


def test_phase_logger_follows_every_shot_not_only_the_first():
    from surgeon.utils import phase_logger

    class Log:
        lines: list = []

        def info(self, fmt, *args):
            self.lines.append(fmt % args)

    log = Log()
    progress = phase_logger(log, every=0.5)
    for _shot in range(2):
        for done in range(1, 5):
            progress("update", done, 4)
    assert log.lines == ["update 2/4 (50%)", "update 4/4 (100%)"] * 2


def test_phase_logger_speaks_up_after_the_interval_between_its_percent_marks():
    from surgeon.utils import phase_logger

    lines = []

    class Log:
        def info(self, fmt, *args):
            lines.append(fmt % args)

    now = [0.0]
    progress = phase_logger(Log(), every=0.5, interval=5.0, clock=lambda: now[0])
    for done in range(1, 5):  # 4 s a unit: the 50% marks alone would leave 8 s silent
        now[0] += 4.0
        progress("solves", done, 100)
    assert lines == ["solves 2/100 (2%)", "solves 4/100 (4%)"]
    now[0] += 60.0
    progress("solves", 4, 100)  # no advance, no line, however long the wait
    assert len(lines) == 2

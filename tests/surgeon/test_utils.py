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

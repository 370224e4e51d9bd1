"""The simulated power cut (vmrepl.disk.powercut): what it may lose, and what it must not."""

from __future__ import annotations

import random
import time
from pathlib import Path

from vmrepl.disk import powercut
from vmrepl.disk.fileio import PositionalFile

PAGE = powercut.PAGE


def _file(path: Path, journal: powercut.Journal) -> PositionalFile:
    f = PositionalFile(path, writable=True, create=True)
    f._journal, f._name = journal, str(path.resolve())  # as the environment variable would set them
    return f


def test_a_flushed_write_survives_and_an_unflushed_one_may_not(tmp_path: Path) -> None:
    data = tmp_path / "data.raw"
    data.write_bytes(bytes(4 * PAGE))
    f = _file(data, powercut.Journal(tmp_path / "j"))
    f.write(b"a" * PAGE, 0)
    f.sync()
    f.write(b"b" * PAGE, PAGE)
    f.close()
    lost = 0
    for seed in range(20):  # each page is kept or lost at random: over 20 cuts both happen
        data.write_bytes(b"a" * PAGE + bytes(3 * PAGE))  # as the last flush left it
        j = powercut.Journal(tmp_path / f"j{seed}")
        g = _file(data, j)
        g.write(b"b" * PAGE, PAGE)  # not flushed: its pre-image (zeros) is recorded
        g.close()
        powercut.cut(tmp_path / f"j{seed}", random.Random(seed))
        raw = data.read_bytes()
        assert raw[:PAGE] == b"a" * PAGE
        lost += raw[PAGE : 2 * PAGE] != b"b" * PAGE
    assert 0 < lost < 20


def test_a_flush_by_a_later_process_makes_an_earlier_ones_writes_durable(tmp_path: Path) -> None:
    """Found by the chaos loop: a target killed (page cache kept) then restarted flushes the file; a later
    cut must not bring back the first process's pre-images, even after the journal started afresh."""
    data, journals = tmp_path / "data.raw", tmp_path / "j"
    data.write_bytes(bytes(2 * PAGE))
    first = _file(data, powercut.Journal(journals))
    first.write(b"x" * PAGE, 0)  # never flushed by this process: it is killed
    first.close()
    time.sleep(0.01)  # journals are ordered by their names' start times
    later = _file(data, powercut.Journal(journals))
    later.write(b"y" * PAGE, PAGE)
    later.sync()  # flushes the first process's page too; this journal empties itself here
    later.close()
    report = powercut.cut(journals, random.Random(1))
    assert data.read_bytes() == b"x" * PAGE + b"y" * PAGE and report.pages_changed == 0

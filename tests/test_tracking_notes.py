"""Training notes go through ``logging`` (logger ``npr.train``): the console shows them unless quiet,
a library user can silence or capture them; fsio's temporary file never outlives a failed write."""

from __future__ import annotations

import logging
import os

import pytest

from npr.fsio import atomic_write_text
from npr.train.tracking import LOGGER, MetricsLog


@pytest.fixture
def npr_logger():
    level, handlers = LOGGER.level, list(LOGGER.handlers)
    yield LOGGER
    LOGGER.setLevel(level)
    LOGGER.handlers[:] = handlers


def test_a_note_is_printed_and_logged(tmp_path, capsys, caplog, npr_logger):
    log = MetricsLog(tmp_path, "stage1", 3, enabled=True, quiet=False)
    with caplog.at_level(logging.INFO, logger="npr.train"):
        log.note("checkpoint step-1")
    assert capsys.readouterr().out == "checkpoint step-1\n"
    assert [(r.name, r.levelno, r.getMessage()) for r in caplog.records] == [
        ("npr.train", logging.INFO, "checkpoint step-1")
    ]
    log.close()
    assert not [h for h in LOGGER.handlers if h is log.console_handler]


def test_a_library_user_silences_notes_through_logging(tmp_path, capsys, npr_logger):
    npr_logger.setLevel(logging.WARNING)
    log = MetricsLog(tmp_path, "stage1", 3, enabled=True, quiet=False)
    log.note("checkpoint step-1")
    assert npr_logger.level == logging.WARNING and capsys.readouterr().out == ""
    log.close()


def test_quiet_and_other_ranks_show_nothing(tmp_path, capsys, npr_logger):
    for enabled, quiet in ((True, True), (False, False)):
        log = MetricsLog(tmp_path, "stage1", 3, enabled=enabled, quiet=quiet)
        log.note("checkpoint step-1")
        log.close()
    assert capsys.readouterr().out == ""


def test_a_failed_atomic_write_keeps_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "config.yaml"
    atomic_write_text(target, "old\n")

    def refuse(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(OSError):
        atomic_write_text(target, "new\n")
    assert target.read_text() == "old\n" and sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]

"""The `mrsfm` logger tree: plain messages on stdout, warnings on stderr, the level a site or user sets."""

from __future__ import annotations

import logging

import pytest

from mrsfm_model import logs


@pytest.fixture(autouse=True)
def _restore():
    yield
    logs.setup("INFO")


def test_levels_route_messages_and_library_loggers_share_one_tree(capsys):
    logs.setup("INFO")
    log = logs.get_logger("evaluation")
    assert log.name == "mrsfm.evaluation" and log.parent is logging.getLogger("mrsfm")
    log.info("arm pretrained 0.9")
    log.warning("a file was skipped")
    out, err = capsys.readouterr()
    assert out == "arm pretrained 0.9\n" and err == "warning: a file was skipped\n"
    logs.setup("WARNING")  # a site that wants only what went wrong
    log.info("hidden")
    log.error("shown")
    out, err = capsys.readouterr()
    assert out == "" and err == "error: shown\n"


def test_setup_is_idempotent_and_refuses_unknown_levels(capsys):
    for _ in range(3):
        logs.setup("INFO")
    logs.get_logger("x").info("once")
    assert capsys.readouterr().out == "once\n"
    with pytest.raises(ValueError, match=r"log level must be one of DEBUG\|INFO\|WARNING\|ERROR, got 'LOUD'"):
        logs.setup("LOUD")

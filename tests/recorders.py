"""A recorder of the test process's own, on the database the test has initialised."""

from __future__ import annotations

from pathlib import Path

from flask import Flask

from gateway.config import DEFAULTS
from gateway.recorder import Recorder


def make_recorder(tmp_path: Path, **config: object) -> Recorder:
    """A started recorder (its writers running) with the default settings and ``config``."""
    app = Flask("recorder-test")
    app.config.update(DEFAULTS)
    app.config.update(JOURNAL_DIR=str(tmp_path / "journal"), **config)
    recorder = Recorder()
    recorder.init_app(app)
    return recorder

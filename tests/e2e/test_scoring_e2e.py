"""The server with the real model refuses to start without the score calibration for it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from server.config import ScoringPolicy
from server.errors import ConfigurationError
from tests.support import RunningServer, make_config


def test_server_refuses_to_start_without_its_calibration(
    tmp_path: Path, start_server: Callable[..., RunningServer]
) -> None:
    config = replace(make_config(tmp_path), scoring=ScoringPolicy(scoring_dir=tmp_path / "none"))
    with pytest.raises(ConfigurationError, match="no score calibration"):
        start_server(config)

"""Fixtures of the benchmark tests: one tiny pipeline for the session."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_pipe():
    from model.pipeline import StarPipeline

    return StarPipeline.load("tiny")

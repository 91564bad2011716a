from app.settings import ApiSettings
from worker.settings import WorkerSettings


def test_settings_read_star_environment(monkeypatch):
    monkeypatch.setenv("STAR_REDIS_URL", "redis://example:6380/2")
    monkeypatch.setenv("STAR_MAX_BATCH", "16")
    monkeypatch.setenv("STAR_PORT", "9001")
    assert ApiSettings().redis_url == "redis://example:6380/2"
    assert ApiSettings().port == 9001
    assert WorkerSettings().max_batch == 16


def test_invalid_setting_is_rejected(monkeypatch):
    import pydantic
    import pytest

    monkeypatch.setenv("STAR_MAX_BATCH", "0")
    with pytest.raises(pydantic.ValidationError, match="max_batch"):
        WorkerSettings()

"""`JOBWIRE_*` variables: parsed by pydantic-settings, refused with a line that says what is wrong."""

from __future__ import annotations

import pytest

from jobwire.settings import DEFAULT_TASKS, Settings, SettingsError


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"JOBWIRE_HISTORY_LIMIT": "abc"}, "JOBWIRE_HISTORY_LIMIT must be an integer, got 'abc'"),
        ({"JOBWIRE_HISTORY_LIMIT": "0"}, "JOBWIRE_HISTORY_LIMIT must be >= 1, got 0"),
        ({"JOBWIRE_REDIS_MAX_CONNECTIONS": "1"}, "JOBWIRE_REDIS_MAX_CONNECTIONS must be >= 2, got 1"),
        ({"JOBWIRE_HEARTBEAT_INTERVAL": "soon"}, "JOBWIRE_HEARTBEAT_INTERVAL must be a number, got 'soon'"),
        ({"JOBWIRE_SUBSCRIBE_TIMEOUT": "-1"}, "JOBWIRE_SUBSCRIBE_TIMEOUT must be > 0, got -1"),
        (
            {"JOBWIRE_TRANSPORTS": "websocket,carrier-pigeon"},
            "JOBWIRE_TRANSPORTS has unknown ['carrier-pigeon']; choose from ['websocket', 'sse', 'polling']",
        ),
    ],
)
def test_bad_values_name_the_variable_the_value_and_the_rule(
    env: dict[str, str], message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(SettingsError) as err:
        Settings.from_env()
    assert str(err.value) == message


def test_lists_and_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JOBWIRE_TRANSPORTS", " sse , polling ")
    monkeypatch.setenv("JOBWIRE_KEY_PREFIX", "")  # empty means unset
    settings = Settings.from_env()
    assert settings.transports == ("sse", "polling") and settings.key_prefix == "jobwire:"
    assert settings.submittable == DEFAULT_TASKS  # the demo app's tasks
    monkeypatch.setenv("JOBWIRE_CELERY_APP", "shop.celeryapp:app")
    assert Settings.from_env().submittable == ()  # a user's app: nothing until named
    monkeypatch.setenv("JOBWIRE_ALLOWED_TASKS", "shop.tasks.export, shop.tasks.report")
    assert Settings.from_env().submittable == ("shop.tasks.export", "shop.tasks.report")

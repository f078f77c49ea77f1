from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from tuneloop.config import Settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for key in list(__import__("os").environ):
        if key.startswith("TUNELOOP_"):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)


def test_defaults_without_file_or_env() -> None:
    settings = Settings()
    assert settings.serve.port == 3000
    assert settings.serve.backend == "onnx"
    assert settings.registry.url == "var/registry"


def test_toml_file_then_environment_take_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "custom.toml"
    config.write_text('[serve]\nport = 4100\nmax_texts_per_request = 8\n[registry]\nurl = "/srv/models"\n')
    monkeypatch.setenv("TUNELOOP_CONFIG", str(config))
    monkeypatch.setenv("TUNELOOP_SERVE__PORT", "4200")
    settings = Settings()
    assert settings.serve.port == 4200  # env beats file
    assert settings.serve.max_texts_per_request == 8  # file beats default
    assert settings.serve.max_chars_per_text == 2000  # untouched default survives a partial section
    assert settings.registry.url == "/srv/models"


def test_default_file_in_working_directory_is_read(tmp_path: Path) -> None:
    (tmp_path / "tuneloop.toml").write_text("[train]\nlora_r = 4\n")
    assert Settings().train.lora_r == 4


def test_missing_named_file_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TUNELOOP_CONFIG", "/nonexistent/tuneloop.toml")
    with pytest.raises(FileNotFoundError, match="TUNELOOP_CONFIG"):
        Settings()


def test_invalid_values_and_unknown_keys_are_rejected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TUNELOOP_SERVE__BACKEND", "tensorflow")
    with pytest.raises(ValidationError, match=r"no serving backend 'tensorflow'; installed: \['onnx', 'torch'\]"):
        Settings()
    monkeypatch.delenv("TUNELOOP_SERVE__BACKEND")
    (tmp_path / "tuneloop.toml").write_text("[serve]\nportt = 1\n")
    with pytest.raises(ValidationError, match="portt"):
        Settings()


@pytest.mark.parametrize(("value", "read"), [("0.4", 0.4), ("version", "version")])
def test_abstain_below_is_a_probability_or_the_versions_own(monkeypatch: pytest.MonkeyPatch, value: str,
                                                           read: object) -> None:
    assert Settings().serve.abstain_below is None  # off unless asked for
    monkeypatch.setenv("TUNELOOP_SERVE__ABSTAIN_BELOW", value)
    assert Settings().serve.abstain_below == read


@pytest.mark.parametrize("value", ["1.5", "0", "often"])
def test_abstain_below_refuses_what_is_not_a_probability(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("TUNELOOP_SERVE__ABSTAIN_BELOW", value)
    with pytest.raises(ValidationError, match="abstain_below"):
        Settings()


def test_every_setting_is_described() -> None:
    from tuneloop.config import config_table

    rows = config_table().splitlines()[2:]
    assert rows and all(not row.endswith("|  |") for row in rows), [row for row in rows if row.endswith("|  |")]


def test_readme_configuration_table_is_the_generated_one() -> None:
    """Edit the descriptions in tuneloop/config.py, then run `tuneloop config-table --readme README.md`."""
    from cli.main import readme_with_config_table
    from tests.support.data import ROOT
    from tuneloop.config import config_table

    readme = (ROOT / "README.md").read_text()
    assert readme_with_config_table(readme, config_table()) == readme


def test_requiring_kafka_without_brokers_is_refused_at_start() -> None:
    with pytest.raises(ValidationError, match="events.require_kafka is set but events.kafka_bootstrap_servers is empty"):
        Settings(events={"require_kafka": True})
    assert Settings(events={"require_kafka": True, "kafka_bootstrap_servers": "kafka:9092"}).events.require_kafka

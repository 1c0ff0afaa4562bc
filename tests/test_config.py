"""Configuration: defaults, file and environment sources, error messages, `mailroomctl config check`."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from mailroom.config import DEFAULT_CONFIG_PATH, config_path, load_settings
from mailroom.errors import ConfigError

MAILROOMCTL = Path(sys.executable).parent / "mailroomctl"


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No MAILROOM_* or CONFIG_PATH from the developer's shell leaks into these tests."""
    for name in list(os.environ):
        if name.startswith("MAILROOM_") or name == "CONFIG_PATH":
            monkeypatch.delenv(name)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(f'hostname = "mail.example.test"\ndata_dir = "{tmp_path}"\n{text}')
    return path


def mailroomctl(*args: str, config: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MAILROOM_")}
    environ.update(CONFIG_PATH=str(config), **env)
    return subprocess.run(
        [str(MAILROOMCTL), *args], env=environ, capture_output=True, text=True, timeout=60
    )


def test_defaults(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, ""))
    assert settings.hostname == "mail.example.test"
    assert settings.data_dir == tmp_path
    assert settings.idle_exit_seconds == 60
    assert settings.smtp.max_recipients == 100
    assert settings.smtp.timeout_seconds == 300
    assert settings.dns.nameservers == []
    assert settings.auth_db == tmp_path / "auth.sqlite3"
    assert settings.mail_root == tmp_path / "mail"
    assert settings.tls_cert == tmp_path / "tls" / "fullchain.pem"
    assert settings.tls_key == tmp_path / "tls" / "privkey.pem"


def test_file_values_and_normalisation(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(
        'hostname = "Mail.Example.TEST."\n'
        f'data_dir = "{tmp_path}"\n'
        'log_level = "debug"\n'
        "[smtp]\nmax_recipients = 5\n"
        '[dns]\nnameservers = ["127.0.0.1:5353"]\n'
    )
    settings = load_settings(path)
    assert settings.hostname == "mail.example.test"
    assert settings.log_level == "DEBUG"
    assert settings.smtp.max_recipients == 5
    assert settings.dns.nameservers == ["127.0.0.1:5353"]


def test_environment_overrides_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, "[smtp]\nmax_recipients = 50\n")
    assert load_settings(path).smtp.max_recipients == 50
    monkeypatch.setenv("MAILROOM_SMTP__MAX_RECIPIENTS", "7")
    monkeypatch.setenv("MAILROOM_IDLE_EXIT_SECONDS", "5")
    settings = load_settings(path)
    assert settings.smtp.max_recipients == 7
    assert settings.idle_exit_seconds == 5


def test_config_path_comes_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert config_path() == DEFAULT_CONFIG_PATH
    path = write(tmp_path, "")
    monkeypatch.setenv("CONFIG_PATH", str(path))
    assert config_path() == path
    assert load_settings().data_dir == tmp_path


@pytest.mark.parametrize(
    ("text", "key", "message"),
    [
        ("bogus = 1\n", "bogus", "unknown key"),
        ("[smtp]\nbogus = 1\n", "smtp.bogus", "unknown key"),
        ("[smtp]\nmax_recipients = 0\n", "smtp.max_recipients", "greater than or equal to 1"),
        ('[smtp]\nmax_recipients = "many"\n', "smtp.max_recipients", "integer"),
        ("[smtp]\ntimeout_seconds = 10\n", "smtp.timeout_seconds", "300"),
        ('log_level = "LOUD"\n', "log_level", "one of DEBUG"),
    ],
)
def test_bad_values_name_the_key_and_the_file(
    tmp_path: Path, text: str, key: str, message: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    assert str(path) in str(caught.value)
    assert f"{key}: " in str(caught.value)
    assert message in str(caught.value)


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ('hostname = "localhost"\ndata_dir = "/var/lib/mailroom"\n', "hostname"),
        ('hostname = "mail.example.test"\ndata_dir = "relative/dir"\n', "data_dir"),
        ('data_dir = "/var/lib/mailroom"\n', "hostname"),
    ],
)
def test_required_and_checked_keys(tmp_path: Path, text: str, key: str) -> None:
    path = tmp_path / "config.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=f"  {key}: "):
        load_settings(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found") as caught:
        load_settings(tmp_path / "nope.toml")
    assert str(tmp_path / "nope.toml") in str(caught.value)


def test_bad_toml(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text('hostname = "mail.example.test\n')
    with pytest.raises(ConfigError, match="not valid TOML") as caught:
        load_settings(path)
    assert str(path) in str(caught.value)


def test_an_error_from_the_environment_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path, "")
    monkeypatch.setenv("MAILROOM_SMTP__MAX_RECIPIENTS", "0")
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    assert "smtp.max_recipients" in str(caught.value)
    assert "from environment variable MAILROOM_SMTP__MAX_RECIPIENTS" in str(caught.value)


def test_an_error_from_the_file_does_not_blame_the_environment(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(write(tmp_path, "[smtp]\nmax_recipients = 0\n"))
    assert "environment" not in str(caught.value)


# -- mailroomctl config check ------------------------------------------------------------------


def test_config_check_prints_the_effective_config_as_toml(tmp_path: Path) -> None:
    path = write(tmp_path, '[dns]\nnameservers = ["127.0.0.1:5353"]\n')
    result = mailroomctl("config", "check", config=path, MAILROOM_SMTP__MAX_RECIPIENTS="7")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert f"{path}: configuration is valid" in result.stdout
    assert "MAILROOM_SMTP__MAX_RECIPIENTS" in result.stdout
    printed = tomllib.loads(result.stdout)
    assert printed["hostname"] == "mail.example.test"
    assert printed["smtp"]["max_recipients"] == 7
    assert printed["dns"]["nameservers"] == ["127.0.0.1:5353"]
    assert printed["tls"]["cert"] == str(tmp_path / "tls" / "fullchain.pem")
    # Everything printed is what the programs will use: it reads back to the same settings.
    reread = tmp_path / "reread.toml"
    reread.write_text(result.stdout)
    assert load_settings(reread).smtp.max_recipients == 7


def test_config_check_json(tmp_path: Path) -> None:
    result = mailroomctl("config", "check", "--json", config=write(tmp_path, ""))
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["data_dir"] == str(tmp_path)
    assert data["smtp"]["max_recipients"] == 100


@pytest.mark.parametrize(
    ("text", "env", "expected"),
    [
        ("bogus = 1\n", {}, "bogus: unknown key"),
        ("[smtp]\nmax_recipients = 0\n", {}, "smtp.max_recipients"),
        ("", {"MAILROOM_SMTP__MAX_RECIPIENTS": "x"}, "MAILROOM_SMTP__MAX_RECIPIENTS"),
        ("this is = not toml =\n", {}, "not valid TOML"),
    ],
)
def test_config_check_reports_errors_without_a_traceback(
    tmp_path: Path, text: str, env: dict[str, str], expected: str
) -> None:
    path = write(tmp_path, text)
    result = mailroomctl("config", "check", config=path, **env)
    assert result.returncode == 1
    assert result.stdout == ""
    assert expected in result.stderr
    assert str(path) in result.stderr
    assert "Traceback" not in result.stderr


def test_config_check_missing_file(tmp_path: Path) -> None:
    result = mailroomctl("config", "check", config=tmp_path / "missing.toml")
    assert result.returncode == 1
    assert result.stderr.startswith(f"mailroomctl: {tmp_path / 'missing.toml'}: ")
    assert "not found" in result.stderr
    assert "Traceback" not in result.stderr


# -- the validated settings kept in the service's cache directory ---------------------------

_LOAD = """
import json, sys
from pathlib import Path
from mailroom.config import load_settings
settings = load_settings(Path(sys.argv[1]), cache=Path(sys.argv[2]))
print(json.dumps({"recipients": settings.smtp.max_recipients, "host": settings.hostname,
                  "pydantic": "pydantic" in sys.modules}))
"""


def _load_in_a_process(config: Path, cache: Path, **env: str) -> dict[str, object]:
    """What a fresh process (a service's start) loads, and whether it imported pydantic."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MAILROOM_")}
    done = subprocess.run(
        [sys.executable, "-c", _LOAD, str(config), str(cache)],
        env={**environ, **env}, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    loaded: dict[str, object] = json.loads(done.stdout)
    return loaded


def test_a_second_start_reads_the_cache_without_pydantic(tmp_path: Path) -> None:
    config, cache = write(tmp_path, "[smtp]\nmax_recipients = 7\n"), tmp_path / "cache"
    cache.mkdir()
    first = _load_in_a_process(config, cache)
    assert first == {"recipients": 7, "host": "mail.example.test", "pydantic": True}
    assert (cache / "settings.pickle").stat().st_mode & 0o777 == 0o600
    assert _load_in_a_process(config, cache) == {**first, "pydantic": False}


def test_the_cache_follows_the_file_and_the_environment(tmp_path: Path) -> None:
    config, cache = write(tmp_path, "[smtp]\nmax_recipients = 7\n"), tmp_path / "cache"
    cache.mkdir()
    _load_in_a_process(config, cache)
    config.write_text(config.read_text().replace("= 7", "= 8"))
    assert _load_in_a_process(config, cache)["recipients"] == 8
    changed = _load_in_a_process(config, cache, MAILROOM_SMTP__MAX_RECIPIENTS="9")
    assert changed == {"recipients": 9, "host": "mail.example.test", "pydantic": True}
    assert _load_in_a_process(config, cache)["recipients"] == 8
    config.write_text(config.read_text().replace("= 8", "= 0"))
    with pytest.raises(ConfigError, match="max_recipients"):  # validated again, refused
        load_settings(config, cache=cache)


def test_an_untrusted_or_forged_cache_is_not_used(tmp_path: Path) -> None:
    config, cache = write(tmp_path, ""), tmp_path / "cache"
    cache.mkdir()
    _load_in_a_process(config, cache)
    kept = cache / "settings.pickle"
    kept.chmod(0o620)  # writable by the group: someone else may have written it
    assert _load_in_a_process(config, cache)["pydantic"] is True
    # The right key, then a pickle that would run a command: refused, validated instead.
    marker = tmp_path / "ran"

    class Forged:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return os.system, (f"touch {marker}",)

    key = kept.read_bytes()[:32]
    kept.write_bytes(key + pickle.dumps(Forged()))
    kept.chmod(0o600)
    assert _load_in_a_process(config, cache) == {
        "recipients": 100, "host": "mail.example.test", "pydantic": True,
    }  # fmt: skip
    assert not marker.exists()
    kept.write_bytes(key + b"\x80\x05truncated")
    assert _load_in_a_process(config, cache)["pydantic"] is True


def test_the_cache_follows_the_pydantic_that_validated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An upgrade of pydantic replaces its files: settings it validated are validated again."""
    from mailroom import config as config_module

    fake = tmp_path / "site" / "pydantic_settings"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))  # found first, never imported
    before = config_module._validators()
    assert str(fake / "__init__.py") in before
    key = config_module._cache_key(tmp_path / "c.toml", b"", {})
    (fake / "__init__.py").write_text("# 2.1\n")  # upgraded
    assert config_module._validators() != before
    assert config_module._cache_key(tmp_path / "c.toml", b"", {}) != key

"""One settings object for the suite: an INI file plus LABVAULT_<SECTION>_<KEY> overrides."""
from __future__ import annotations

import configparser
import functools
import os
import threading
from pathlib import Path
from typing import Callable, Mapping, TypeVar

from config import DEFAULT_INI

ENV_PREFIX = "LABVAULT_"


class SettingsError(Exception):
    """A setting is missing or has a value of the wrong kind."""


class Settings:
    """Read-only view of the suite's configuration.

    Built once (``Settings.load``) and passed down; nothing reads the file or the
    environment again afterwards.
    """

    def __init__(self, parser: configparser.ConfigParser, source: Path | None = None):
        self._parser = parser
        self.source = source

    @classmethod
    def load(cls, path: str | os.PathLike | None = None,
             environ: Mapping[str, str] | None = None,
             overrides: Mapping[str, Mapping[str, object]] | None = None) -> Settings:
        """Read the defaults, then ``path`` (or LABVAULT_CONFIG), then the environment, then ``overrides``."""
        environ = os.environ if environ is None else environ
        parser = configparser.ConfigParser(interpolation=None)
        parser.read(DEFAULT_INI, encoding="utf-8")
        source = path or environ.get(ENV_PREFIX + "CONFIG")
        if source:
            source = Path(source)
            if not source.is_file():
                raise SettingsError(f"settings file {source} does not exist")
            parser.read(source, encoding="utf-8")
        for name, value in environ.items():
            if not name.startswith(ENV_PREFIX) or name == ENV_PREFIX + "CONFIG":
                continue
            section, _, key = name[len(ENV_PREFIX):].lower().partition("_")
            if section and key:
                _set(parser, section, key, value)
        for section, values in (overrides or {}).items():
            for key, value in values.items():
                _set(parser, section, key, str(value))
        return cls(parser, Path(source) if source else None)

    def with_overrides(self, overrides: Mapping[str, Mapping[str, object]]) -> Settings:
        """A copy with some values replaced (used by the command line's --data-dir and --port)."""
        parser = configparser.ConfigParser(interpolation=None)
        parser.read_dict(self._parser)
        for section, values in overrides.items():
            for key, value in values.items():
                _set(parser, section, key, str(value))
        return Settings(parser, self.source)

    # -- typed access -------------------------------------------------------

    def get(self, section: str, key: str, default: str | None = None) -> str:
        try:
            raw = self._parser.get(section, key)
        except (configparser.NoSectionError, configparser.NoOptionError):
            if default is None:
                raise SettingsError(f"missing setting [{section}] {key}") from None
            raw = default
        return raw.replace("{data_dir}", str(self.data_dir)) if "{data_dir}" in raw else raw

    def getint(self, section: str, key: str, default: int | None = None) -> int:
        return int(self._typed(section, key, default, int))

    def getfloat(self, section: str, key: str, default: float | None = None) -> float:
        return float(self._typed(section, key, default, float))

    def getbool(self, section: str, key: str, default: bool | None = None) -> bool:
        value = self.get(section, key, None if default is None else str(default)).strip().lower()
        if value in ("1", "true", "yes", "on"):
            return True
        if value in ("0", "false", "no", "off", ""):
            return False
        raise SettingsError(f"[{section}] {key} must be true or false, not {value!r}")

    def getlist(self, section: str, key: str) -> list[str]:
        return [part.strip() for part in self.get(section, key, "").split(",") if part.strip()]

    def _typed(self, section, key, default, kind):
        value = self.get(section, key, None if default is None else str(default))
        try:
            return kind(value)
        except ValueError:
            raise SettingsError(f"[{section}] {key} must be a {kind.__name__}, not {value!r}") from None

    # -- derived values -----------------------------------------------------

    @property
    def data_dir(self) -> Path:
        return Path(self._parser.get("data", "dir", fallback="./var")).expanduser().resolve()

    def path(self, section: str, key: str) -> Path:
        return Path(self.get(section, key)).expanduser().resolve()

    def service_url(self, service: str, default_port: int | None = None) -> str:
        """Base URL (no trailing slash) other processes use to reach ``service``."""
        url = self.get(service, "url", "").strip()
        if not url:
            url = f"http://127.0.0.1:{self.getint(service, 'port', default_port)}"
        return url.rstrip("/")

    @property
    def service_token(self) -> str:
        """The shared secret between the services ([auth] service_token); empty when not required."""
        return self.get("auth", "service_token", "").strip()

    def database_url(self, service: str) -> str:
        return self.get(service, "database")

    def as_environ(self) -> dict[str, str]:
        """Every value as LABVAULT_* variables, so a child process sees exactly these settings."""
        env = {}
        for section in self._parser.sections():
            for key, value in self._parser.items(section):
                env[f"{ENV_PREFIX}{section.upper()}_{key.upper()}"] = value
        env[f"{ENV_PREFIX}DATA_DIR"] = str(self.data_dir)
        return env


T = TypeVar("T")


def once_per_settings(build: Callable[[Settings], T]) -> Callable[[Settings], T]:
    """``build`` run once per process and settings object; later calls answer its first result
    (a worker's database binding, HTTP session, Celery app). Each entry keeps its settings
    object alive, so no later settings object can reuse its id() and be taken for it (tests
    build many)."""
    built: dict[int, tuple[Settings, T]] = {}
    lock = threading.Lock()

    @functools.wraps(build)
    def cached(settings: Settings) -> T:
        entry = built.get(id(settings))
        if entry is None:
            with lock:
                entry = built.get(id(settings))
                if entry is None:
                    entry = built[id(settings)] = (settings, build(settings))
        return entry[1]
    return cached


def _set(parser: configparser.ConfigParser, section: str, key: str, value: str) -> None:
    if not parser.has_section(section):
        parser.add_section(section)
    parser.set(section, key, value)

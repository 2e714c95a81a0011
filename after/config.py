"""Configuration: a config file, then the environment, then command-line flags.

| variable                  | config file key | default                   |
|---------------------------|-----------------|---------------------------|
| AFTER_COUCHDB_URL         | couchdb_url     | http://127.0.0.1:5984/    |
| AFTER_DB                  | db              | tasks                     |
| AFTER_COUCHDB_USER        | user            | (from the URL, or none)   |
| AFTER_COUCHDB_PASSWORD    | password        | (from the URL, or none)   |
| AFTER_COUCHDB_AUTH        | auth            | basic (or cookie)         |
| AFTER_JOBS                | jobs            | ./jobs                    |
| AFTER_HOME                | home            | ~/.after                  |

AFTER_COUCHDB_URL may name the nodes of one CouchDB cluster, comma-separated: a
worker uses the first and moves to the next when its node stops answering.

The config file is TOML, named by AFTER_CONFIG, by default ~/.after/config.toml
when it exists. A file that holds a password (the `password` key or a password
in `couchdb_url`) must be readable by its owner only (chmod 600): otherwise it
is refused. The environment overrides the file, flags override both.
Passwords are never shown: `display_url` and `redact` put *** in their place.
"""

from __future__ import annotations

import os
import stat
import tomllib
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit, urlunsplit

DEFAULT_URL = "http://127.0.0.1:5984/"
DEFAULT_DB = "tasks"
AUTH_METHODS = ("basic", "cookie")
FILE_KEYS = ("couchdb_url", "db", "user", "password", "auth", "jobs", "home")


class ConfigError(ValueError):
    """A configuration that cannot be used; the message says what to do (and holds no secret)."""


def default_config_path() -> Path:
    return Path.home() / ".after" / "config.toml"


def read_config_file(path: Path) -> dict[str, str]:
    """The settings of a TOML config file, checked: known keys, string values, and a
    file holding a password readable by its owner only."""
    try:
        raw = path.read_bytes()
        mode = path.stat().st_mode
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc.strerror}") from None
    try:
        values = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        # The parser's message names a line and column, never the file's content.
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    unknown = sorted(set(values) - set(FILE_KEYS))
    if unknown:
        raise ConfigError(
            f"config file {path}: unknown key {', '.join(unknown)} (known: {', '.join(FILE_KEYS)})"
        )
    for key, value in values.items():
        if not isinstance(value, str):
            raise ConfigError(f"config file {path}: {key} must be a string")
    url_password = split_credentials(values.get("couchdb_url", DEFAULT_URL))[2]
    has_password = bool(values.get("password")) or url_password is not None
    if has_password and mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(
            f"config file {path} holds a password but its mode {stat.filemode(mode)} lets "
            f"others read it; run `chmod 600 {path}` (or move the password to "
            "AFTER_COUCHDB_PASSWORD)"
        )
    return values


@dataclass(frozen=True)
class Config:
    couchdb_url: str = DEFAULT_URL
    db: str = DEFAULT_DB
    user: str | None = None
    password: str | None = None
    jobs: Path = Path("jobs")
    home: Path = Path.home() / ".after"
    auth_method: str = "basic"  # or "cookie": log in through POST /_session

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Config:
        """The config file (if any), then the environment on top of it.

        The file is the one AFTER_CONFIG names; reading the real environment
        (env=None) without AFTER_CONFIG, it is ~/.after/config.toml if that
        exists. An explicit env dict reads only the file it names, so that a
        program or a test is not affected by the user's own file.
        """
        real = env is None
        env = dict(os.environ if env is None else env)
        path: Path | None = None
        if env.get("AFTER_CONFIG"):
            path = Path(env["AFTER_CONFIG"]).expanduser()
        elif real and "AFTER_CONFIG" not in env and default_config_path().is_file():
            path = default_config_path()
        file = read_config_file(path) if path else {}
        for key in ("jobs", "home"):  # relative paths in the file are relative to the file
            if path and key in file and not Path(file[key]).expanduser().is_absolute():
                file[key] = str(path.parent / file[key])

        file_url, file_url_user, file_url_password = split_credentials(
            file.get("couchdb_url", DEFAULT_URL)
        )
        file_user = file.get("user", file_url_user)
        file_password = file.get("password", file_url_password)

        url, url_user, url_password = file_url, None, None
        if "AFTER_COUCHDB_URL" in env:
            url, url_user, url_password = split_credentials(env["AFTER_COUCHDB_URL"])
        user = env.get("AFTER_COUCHDB_USER", url_user)
        password = env.get("AFTER_COUCHDB_PASSWORD", url_password)
        # The file's password goes only with the file's user (or with no user named elsewhere).
        if user is None:
            user = file_user
        if password is None and (file_user is None or user == file_user):
            password = file_password

        auth_method = env.get("AFTER_COUCHDB_AUTH", file.get("auth", "basic")).strip().lower()
        if auth_method not in AUTH_METHODS:
            raise ConfigError(
                f"AFTER_COUCHDB_AUTH / auth must be one of {', '.join(AUTH_METHODS)} "
                f"(got {auth_method!r})"
            )
        home = env.get("AFTER_HOME", file.get("home", str(Path.home() / ".after")))
        return cls(
            couchdb_url=url,
            db=env.get("AFTER_DB", file.get("db", DEFAULT_DB)),
            user=user,
            password=password,
            jobs=Path(env.get("AFTER_JOBS", file.get("jobs", "jobs"))).expanduser(),
            home=Path(home).expanduser(),
            auth_method=auth_method,
        )

    def override(
        self,
        couchdb_url: str | None = None,
        db: str | None = None,
        jobs: str | Path | None = None,
        home: str | Path | None = None,
    ) -> Config:
        """A copy with the flags that were given; credentials in a URL flag win."""
        changed = self
        if couchdb_url:
            url, user, password = split_credentials(couchdb_url)
            changed = replace(
                changed,
                couchdb_url=url,
                user=user if user is not None else changed.user,
                password=password if password is not None else changed.password,
            )
        if db:
            changed = replace(changed, db=db)
        if jobs:
            changed = replace(changed, jobs=Path(jobs))
        if home:
            changed = replace(changed, home=Path(home).expanduser())
        return changed

    @property
    def display_url(self) -> str:
        """The server URL as it may be shown: user name kept, password never."""
        return with_credentials(self.couchdb_url, self.user, "***" if self.password else None)

    @property
    def couchdb_urls(self) -> list[str]:
        """The node URLs, without credentials: one, or the nodes of a cluster to fail
        over between (after.couch.Server)."""
        return node_urls(self.couchdb_url)

    @property
    def auth(self) -> tuple[str, str] | None:
        return (self.user, self.password or "") if self.user else None


def node_urls(urls: str) -> list[str]:
    """The URLs of a comma-separated list (the nodes of one CouchDB cluster)."""
    return [url.strip() for url in urls.split(",") if url.strip()]


def split_credentials(url: str) -> tuple[str, str | None, str | None]:
    """Take `user:password@` out of a URL: (url without them, user, password).

    A comma-separated list of node URLs gives each URL without credentials, joined
    again, and the first user and password found (one cluster has one set of users).
    """
    if "," in url:
        split = [split_credentials(one) for one in node_urls(url)]
        if not split:
            raise ConfigError("the CouchDB URL list is empty")
        user = next((u for _, u, _ in split if u is not None), None)
        password = next((p for _, u, p in split if p is not None and u == user), None)
        return ",".join(plain for plain, _, _ in split), user, password
    parts = urlsplit(url if "://" in url else f"http://{url}")
    user = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password is not None else None
    host = parts.hostname or ""
    if ":" in host:  # an IPv6 literal keeps its brackets
        host = f"[{host}]"
    netloc = f"{host}:{parts.port}" if parts.port else host
    path = parts.path if parts.path.endswith("/") else parts.path + "/"
    return urlunsplit((parts.scheme, netloc, path, "", "")), user, password


def with_credentials(url: str, user: str | None, password: str | None) -> str:
    if not user:
        return url
    if "," in url:
        return ",".join(with_credentials(one, user, password) for one in node_urls(url))
    parts = urlsplit(url)
    userinfo = quote(user, safe="")
    if password is not None:
        userinfo += ":" + (password if password == "***" else quote(password, safe=""))
    return urlunsplit((parts.scheme, f"{userinfo}@{parts.netloc}", parts.path, "", ""))


def redact(url: str) -> str:
    """A URL with its password, if any, replaced by ***."""
    plain, user, password = split_credentials(url)
    return with_credentials(plain, user, "***" if password else None)

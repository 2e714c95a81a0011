"""Configuration: environment first, command-line flags override.

| variable                  | default                   |
|---------------------------|---------------------------|
| AFTER_COUCHDB_URL         | http://127.0.0.1:5984/    |
| AFTER_DB                  | tasks                     |
| AFTER_COUCHDB_USER        | (from the URL, or none)   |
| AFTER_COUCHDB_PASSWORD    | (from the URL, or none)   |
| AFTER_JOBS                | ./jobs                    |
| AFTER_HOME                | ~/.after                  |
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit, urlunsplit

DEFAULT_URL = "http://127.0.0.1:5984/"
DEFAULT_DB = "tasks"


@dataclass(frozen=True)
class Config:
    couchdb_url: str = DEFAULT_URL
    db: str = DEFAULT_DB
    user: str | None = None
    password: str | None = None
    jobs: Path = Path("jobs")
    home: Path = Path.home() / ".after"

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Config:
        env = dict(os.environ if env is None else env)
        url, url_user, url_password = split_credentials(env.get("AFTER_COUCHDB_URL", DEFAULT_URL))
        return cls(
            couchdb_url=url,
            db=env.get("AFTER_DB", DEFAULT_DB),
            user=env.get("AFTER_COUCHDB_USER", url_user),
            password=env.get("AFTER_COUCHDB_PASSWORD", url_password),
            jobs=Path(env.get("AFTER_JOBS", "jobs")),
            home=Path(env.get("AFTER_HOME", str(Path.home() / ".after"))).expanduser(),
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
    def auth(self) -> tuple[str, str] | None:
        return (self.user, self.password or "") if self.user else None


def split_credentials(url: str) -> tuple[str, str | None, str | None]:
    """Take `user:password@` out of a URL: (url without them, user, password)."""
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
    parts = urlsplit(url)
    userinfo = quote(user, safe="")
    if password is not None:
        userinfo += ":" + (password if password == "***" else quote(password, safe=""))
    return urlunsplit((parts.scheme, f"{userinfo}@{parts.netloc}", parts.path, "", ""))


def redact(url: str) -> str:
    """A URL with its password, if any, replaced by ***."""
    plain, user, password = split_credentials(url)
    return with_credentials(plain, user, "***" if password else None)

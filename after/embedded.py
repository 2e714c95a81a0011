"""The embedded CouchDB-compatible server: PouchDB Server from npm, pinned.

It is the local default and the test server; production belongs on Apache
CouchDB 3.x. PouchDB Server dies, wedges or leaks on some ordinary requests
when started plainly (couchdb-compat.md, "PouchDB Server hazards"), so it
always runs with our preload `after/node/guard.js`, which patches those code
paths and refuses to start on any other PouchDB Server than the pinned one,
and with `--unhandled-rejections=warn`, bound to loopback, with its data,
config and log inside one directory.

`after couchdb` runs it under a supervisor (after/supervisor.py) that restarts
it when it dies or wedges. Exit codes of the server process, for the
supervisor: 70 an uncaught exception (one `after-embedded-guard: fatal:` line
in the log), 71 it could not listen (e.g. the port is in use), 78 refused to
start (not the pinned, unmodified PouchDB Server). It exits 0 on SIGTERM.
"""

from __future__ import annotations

import ctypes
import hashlib
import hmac
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import requests

REPO_ROOT = Path(__file__).resolve().parent.parent
PINNED_VERSION = "4.2.0"
GUARD = Path(__file__).resolve().parent / "node" / "guard.js"

EXIT_FATAL = 70
EXIT_LISTEN = 71
EXIT_REFUSED = 78
EXIT_MEANINGS = {
    EXIT_FATAL: "it crashed on an uncaught exception",
    EXIT_LISTEN: "it could not listen on its port (in use?)",
    EXIT_REFUSED: "it refused to start: PouchDB Server is not the pinned, unmodified version",
}

PR_SET_PDEATHSIG = 1  # prctl(2), Linux

# PouchDB Server hashes admin passwords with PBKDF2-SHA1 and 10 iterations
# (couch_httpd_auth/iterations) and re-derives the key on every Basic-auth
# request, in JavaScript; we store the same hash it would.
ADMIN_HASH_ITERATIONS = 10


class EmbeddedServerError(RuntimeError):
    pass


SERVER_SCRIPT = Path("node_modules") / "pouchdb-server" / "bin" / "pouchdb-server"
# The pinned server: package.json and its lockfile, in the checkout, or inside the
# installed package (the wheel carries them as after/node/, see pyproject.toml).
NPM_FILES = ("package.json", "package-lock.json")


def find_pouchdb_server(home: Path | None = None) -> Path:
    """The pouchdb-server script: $AFTER_POUCHDB_SERVER, node_modules in the checkout or
    the cwd, or the copy `after couchdb` installed into `home`/node."""
    candidates = [os.environ.get("AFTER_POUCHDB_SERVER", "")]
    candidates += [str(base / SERVER_SCRIPT) for base in (REPO_ROOT, Path.cwd())]
    if home is not None:
        candidates.append(str(home / "node" / SERVER_SCRIPT))
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    raise EmbeddedServerError(
        "PouchDB Server is not installed: `after couchdb` installs it into AFTER_HOME/node "
        f"(with npm), `npm ci` in an After checkout ({REPO_ROOT}) does it there, or set "
        "AFTER_POUCHDB_SERVER to its bin/pouchdb-server"
    )


def pinned_files() -> Path:
    """The folder that holds the pinned package.json and package-lock.json."""
    packaged = Path(__file__).resolve().parent / "node"
    return packaged if (packaged / "package-lock.json").is_file() else REPO_ROOT


def install_pouchdb_server(home: Path, say: Callable[[str], None] = print) -> Path:
    """Install the pinned PouchDB Server into `home`/node with the machine's npm
    (`npm ci`: exactly the lockfile's versions), its progress on the terminal."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        missing = " and ".join(name for name, path in (("node", node), ("npm", npm)) if not path)
        raise EmbeddedServerError(
            f"the embedded server is PouchDB Server, which needs Node.js 20 or later and npm: "
            f"{missing} not found on PATH. Install them (Debian, Ubuntu: `apt install nodejs "
            "npm`; elsewhere https://nodejs.org), or run After against an Apache CouchDB "
            "(AFTER_COUCHDB_URL)"
        )
    target = home / "node"
    target.mkdir(parents=True, exist_ok=True)
    for name in NPM_FILES:
        shutil.copyfile(pinned_files() / name, target / name)
    say(f"installing PouchDB Server {PINNED_VERSION}, pinned by package-lock.json, into {target}")
    say("(npm ci: a minute or two, once)")
    command = [npm, "ci", "--no-audit", "--no-fund", "--loglevel=error", "--progress=true"]
    finished = subprocess.run(command, cwd=target, check=False)
    if finished.returncode != 0:
        raise EmbeddedServerError(
            f"npm ci failed (exit {finished.returncode}) in {target}: see its output above"
        )
    return find_pouchdb_server(home)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def hash_admin_password(password: str, iterations: int = ADMIN_HASH_ITERATIONS) -> str:
    """The `-pbkdf2-<key>,<salt>,<iterations>` form CouchDB and PouchDB Server keep in `admins`."""
    salt = secrets.token_hex(16)
    key = hashlib.pbkdf2_hmac("sha1", password.encode(), salt.encode(), iterations, 20)
    return f"-pbkdf2-{key.hex()},{salt},{iterations}"


def _admin_hash_matches(stored: object, password: str) -> bool:
    if not isinstance(stored, str) or not stored.startswith("-pbkdf2-"):
        return False
    try:
        key, salt, iterations = stored[len("-pbkdf2-") :].split(",")
        derived = hashlib.pbkdf2_hmac("sha1", password.encode(), salt.encode(), int(iterations), 20)
    except ValueError:
        return False
    return hmac.compare_digest(derived.hex(), key)


def seed_admin(data_dir: Path, admin: tuple[str, str]) -> None:
    """Put a server admin into data_dir/config.json, already hashed.

    PouchDB Server reads `admins` from that file when it starts. It would hash a
    plain password itself, but only asynchronously and ignoring it until then,
    so we write the hash: there is no admin-party window. Other settings and
    admins in the file are kept; an admin whose hash already matches is left alone.
    """
    name, password = admin
    if not name or not password:
        raise EmbeddedServerError("the embedded server admin needs a name and a password")
    config_path = data_dir / "config.json"
    config: dict = {}
    if config_path.exists():
        try:
            config = json.loads(config_path.read_text() or "{}")
        except json.JSONDecodeError as exc:
            raise EmbeddedServerError(f"{config_path} is not valid JSON: {exc}") from exc
    admins = config.setdefault("admins", {})
    if _admin_hash_matches(admins.get(name), password):
        return
    admins[name] = hash_admin_password(password)
    data_dir.mkdir(parents=True, exist_ok=True)
    temporary = config_path.with_name(".config.json.after-tmp")
    temporary.write_text(json.dumps(config, indent=2) + "\n")
    temporary.chmod(0o600)
    temporary.replace(config_path)


def command(
    port: int,
    data_dir: Path,
    admin: tuple[str, str] | None = None,
    node_flags: Sequence[str] = (),
) -> list[str]:
    """The command line that runs the guarded server.

    With `admin` = (name, password) the admin is first written into
    data_dir/config.json (see seed_admin); without it an existing config's
    admins apply, or none: "admin party", everyone is admin. `node_flags` go
    to Node.js itself (the benchmark's profiler preload).
    """
    node = shutil.which("node")
    if node is None:
        raise EmbeddedServerError(
            "Node.js is not installed (`node` is not on PATH); "
            "After's embedded server needs Node.js 20"
        )
    if not GUARD.is_file():
        raise EmbeddedServerError(f"After's guard for PouchDB Server is missing: {GUARD}")
    server = find_pouchdb_server()
    if admin is not None:
        seed_admin(data_dir, admin)
    return [
        node,
        *node_flags,
        "--unhandled-rejections=warn",
        "--require",
        str(GUARD),
        str(server),
        "--port",
        str(port),
        "--host",
        "127.0.0.1",
        "--dir",
        str(data_dir),
        "--config",
        str(data_dir / "config.json"),
        "--no-stdout-logs",
    ]


def start(
    port: int,
    data_dir: Path,
    log_path: Path,
    detach: bool = False,
    admin: tuple[str, str] | None = None,
    die_with_parent: bool = False,
    node_flags: Sequence[str] = (),
    env: dict[str, str] | None = None,
) -> subprocess.Popen:
    """Start the server in the background; its output goes to log_path.

    `admin` = (name, password) pre-seeds a server admin (see seed_admin); the
    default is none, i.e. admin party. With `die_with_parent` the server is
    killed when the calling thread's process dies (Linux; see parent_death_signal).
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    argv = command(port, data_dir, admin, node_flags)
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            argv,
            cwd=data_dir,  # PouchDB Server writes its log.txt into the working directory
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=detach,
            preexec_fn=parent_death_signal() if die_with_parent else None,
            env=env,
        )


def parent_death_signal() -> Callable[[], None] | None:
    """A preexec_fn that has the child SIGKILLed when its parent dies; None where that is unknown.

    A supervisor killed with SIGKILL cannot stop its server, which would keep
    the port and the data. Linux's prctl(PR_SET_PDEATHSIG) ties the child to
    the thread that forks it, so supervisors start servers from their main thread.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def die_with_parent() -> None:
        prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL))
        if os.getppid() != parent:  # the parent died before prctl: no signal would come
            os.kill(os.getpid(), signal.SIGKILL)

    return die_with_parent


def exit_reason(returncode: int) -> str:
    """`code 71: it could not listen ...`, `code -9: killed by SIGKILL`, or just `code N`."""
    if returncode < 0:
        try:
            return f"code {returncode}: killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"code {returncode}: killed by signal {-returncode}"
    meaning = EXIT_MEANINGS.get(returncode)
    return f"code {returncode}: {meaning}" if meaning else f"code {returncode}"


def health_problem(url: str, timeout: float) -> str | None:
    """None if the server answers a request that opens a database within `timeout` s, else why not.

    PouchDB Server can wedge so that `GET /` still answers while every request
    that opens a database hangs (couchdb-compat.md). A login with a wrong
    password is no test either: the authentication layer reads `_users` its
    own way and answers 401 on a wedged server too. So the check is an
    anonymous `GET /_users`, which opens the database; any HTTP answer will do
    (200 on PouchDB Server; a 401 where anonymous requests may not read it).
    """
    with requests.Session() as session:
        session.trust_env = False  # loopback: no proxy, no .netrc credentials
        try:
            session.get(url.rstrip("/") + "/_users", timeout=timeout)
        except requests.Timeout:
            return f"GET /_users got no answer within {timeout:g} s"
        except requests.RequestException as exc:
            return f"GET /_users failed ({type(exc).__name__})"
    return None


def wait_healthy(url: str, timeout: float = 30.0, process: subprocess.Popen | None = None) -> None:
    """Wait until the server answers `GET /` and a database request.

    `GET /` alone can answer while database requests hang (couchdb-compat.md),
    so the check also reads `_users`. Credentials in the URL are used; without
    them a server with an admin answers `_users` with 401/403, which still
    shows that databases open.
    """
    deadline = time.monotonic() + timeout
    last_error = "no answer"
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise EmbeddedServerError(
                f"the embedded server exited ({exit_reason(process.returncode)})"
            )
        try:
            requests.get(url, timeout=2).raise_for_status()
            answer = requests.get(url.rstrip("/") + "/_users", timeout=2)
            if answer.status_code not in (401, 403):
                answer.raise_for_status()
            return
        except requests.RequestException as exc:
            last_error = type(exc).__name__
        time.sleep(0.1)
    raise EmbeddedServerError(
        f"the embedded server at {url} was not healthy after {timeout:.0f}s ({last_error})"
    )


def stop(process: subprocess.Popen, timeout: float = 10.0) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

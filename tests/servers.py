"""Private throwaway PostgreSQL and Redis servers for the fault tests.

Each server gets its own free port and its own temporary data directory, so a
test may stop, kill (SIGKILL) and restart it without disturbing any other test
or the shared servers that ``GZX_TEST_DATABASE_URL`` / ``GZX_TEST_REDIS_URL``
point at::

    with PostgresServer(dbname="gzx_fault") as pg:
        engine = create_engine(pg.url)
        ...
        pg.kill()      # SIGKILL of the postmaster: a crash
        pg.start()     # crash recovery, same port, same data

    with RedisServer() as rd:
        client = redis.Redis.from_url(rd.url)
        ...

Both work when running as root: postgres then runs as the ``postgres`` system
user (through ``setpriv``, ``runuser`` or ``su``) on a data directory chowned to
it. Missing binaries raise :class:`ServerUnavailable`, which tests turn into a
skip with its message as the reason.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import os
import pwd
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import weakref
from pathlib import Path
from types import TracebackType
from typing import Self
from urllib.parse import quote

__all__ = [
    "PostgresServer",
    "RedisServer",
    "ServerError",
    "ServerUnavailable",
    "free_port",
    "port_is_open",
]


class ServerError(RuntimeError):
    """A private server did not start or stop as asked."""


class ServerUnavailable(ServerError):
    """The server's binaries (or a user to run them as) are not installed here."""


# ------------------------------------------------------------------ helpers


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_is_open(port: int, host: str = "127.0.0.1", timeout: float = 0.5) -> bool:
    """Whether something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _pid_alive(pid: int) -> bool:
    """Running and not a zombie (PID 1 in some containers never reaps orphans)."""
    with contextlib.suppress(ChildProcessError, OSError):
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False  # it was our child and we just reaped it
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _children(pid: int) -> list[int]:
    """Process ids whose parent is pid."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(entry.name))
    return found


def _wait_dead(pids: list[int], timeout: float) -> list[int]:
    """Wait until none of pids is alive; return those still alive at timeout."""
    deadline = time.monotonic() + timeout
    alive = [p for p in pids if _pid_alive(p)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.05)
        alive = [p for p in alive if _pid_alive(p)]
    return alive


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def _chown_tree(top: Path, user: str) -> None:
    pw = pwd.getpwnam(user)
    for root, dirs, files in os.walk(top):
        os.chown(root, pw.pw_uid, pw.pw_gid)
        for name in dirs + files:
            with contextlib.suppress(FileNotFoundError):
                os.chown(os.path.join(root, name), pw.pw_uid, pw.pw_gid, follow_symlinks=False)


def _is_root() -> bool:
    return os.geteuid() == 0


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# --------------------------------------------------------------- PostgreSQL


def find_postgres_bin() -> Path:
    """The directory holding initdb, pg_ctl and postgres (newest version first)."""
    candidates: list[Path] = []
    for found_dir in sorted(
        glob.glob("/usr/lib/postgresql/*/bin"),
        key=lambda p: [int(x) if x.isdigit() else 0 for x in p.split("/")[-2].split(".")],
        reverse=True,
    ):
        candidates.append(Path(found_dir))
    for name in ("pg_ctl", "initdb"):
        found = shutil.which(name)
        if found:
            candidates.append(Path(found).resolve().parent)
    for d in candidates:
        if all(os.access(d / tool, os.X_OK) for tool in ("initdb", "pg_ctl", "postgres")):
            return d
    raise ServerUnavailable(
        "PostgreSQL server binaries (initdb, pg_ctl, postgres) not found under "
        "/usr/lib/postgresql/*/bin or on PATH (apt-get install postgresql)"
    )


def _run_as_prefix(user: str) -> list[str]:
    """A command prefix that runs the rest as user (root only)."""
    try:
        pwd.getpwnam(user)
    except KeyError:
        raise ServerUnavailable(
            f"running as root and there is no {user!r} user to run postgres as "
            f"(useradd --system {user}, or run scripts/test-services.sh once)"
        ) from None
    if shutil.which("setpriv"):
        return ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups", "--"]
    if shutil.which("runuser"):
        return ["runuser", "-u", user, "--"]
    su = shutil.which("su")
    if su:
        # su wants one shell string; the wrapper below quotes the argv.
        return [su, "-s", "/bin/sh", user, "-c"]
    raise ServerUnavailable("running as root and none of setpriv, runuser, su is installed")


_TEMPLATES: dict[tuple[str, str | None], Path] = {}


class PostgresServer:
    """A private PostgreSQL cluster: own temporary data directory, own free port.

    ``url`` is a SQLAlchemy URL (``postgresql+psycopg://postgres@127.0.0.1:PORT/DB``),
    ``conninfo`` the same for libpq / psycopg. Trust authentication, superuser
    ``postgres``. The port stays the same across stop/kill/start.
    """

    def __init__(
        self,
        dbname: str = "postgres",
        *,
        port: int | None = None,
        base_dir: str | Path | None = None,
        user: str = "postgres",
        startup_timeout: float = 60.0,
        settings: dict[str, str] | None = None,
    ) -> None:
        self.bin_dir = find_postgres_bin()
        self.dbname = dbname
        self.port = port or free_port()
        self._port_given = port is not None
        self.startup_timeout = startup_timeout
        self.settings = dict(settings or {})
        self._os_user = user if _is_root() else None
        self._prefix = _run_as_prefix(user) if self._os_user else []
        self._own_base = base_dir is None
        self.base_dir = Path(base_dir or tempfile.mkdtemp(prefix="gzx-pg-"))
        self.data_dir = self.base_dir / "data"
        self.log_file = self.base_dir / "postgres.log"
        self._initialized = False
        self._db_created = dbname == "postgres"
        base = self.base_dir
        own = self._own_base
        self._finalizer = weakref.finalize(self, PostgresServer._emergency_cleanup, base, own)

    # -- addresses
    @property
    def url(self) -> str:
        return self.url_for(self.dbname)

    @property
    def conninfo(self) -> str:
        """The libpq / psycopg form of url."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/{quote(self.dbname, safe='')}"

    def url_for(self, dbname: str) -> str:
        """A SQLAlchemy URL to another database of this server."""
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{quote(dbname, safe='')}"

    # -- running things as the server's user
    def _cmd(self, argv: list[str]) -> list[str]:
        if not self._prefix:
            return argv
        if self._prefix[-1] == "-c":  # su: one shell string
            return [*self._prefix, shlex.join(argv)]
        return [*self._prefix, *argv]

    def _run(self, argv: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self._cmd(argv),
            cwd="/",
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def _chown(self) -> None:
        if self._os_user:
            _chown_tree(self.base_dir, self._os_user)

    def _template(self) -> Path:
        """A pristine initdb'd data directory, made once per process and copied per server."""
        key = (str(self.bin_dir), self._os_user)
        template = _TEMPLATES.get(key)
        if template is not None and (template / "PG_VERSION").exists():
            return template
        base = Path(tempfile.mkdtemp(prefix="gzx-pg-template-"))
        atexit.register(shutil.rmtree, base, ignore_errors=True)
        base.chmod(0o755)  # let the server's user reach its data directory
        template = base / "data"
        template.mkdir(mode=0o700)
        if self._os_user:
            _chown_tree(base, self._os_user)
        result = self._run(
            [
                str(self.bin_dir / "initdb"),
                "-D", str(template),
                "-U", "postgres",
                "--auth=trust",
                "-E", "UTF8",
                "--no-locale",
                "--no-sync",
            ],
            timeout=120,
        )  # fmt: skip
        if result.returncode != 0:
            raise ServerError(f"initdb failed:\n{result.stdout}\n{result.stderr}")
        _TEMPLATES[key] = template
        return template

    # -- lifecycle
    def _initdb(self) -> None:
        template = self._template()
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self.base_dir.chmod(0o755)  # let the server's user reach its data directory
        if self.data_dir.exists():
            shutil.rmtree(self.data_dir)
        shutil.copytree(template, self.data_dir, symlinks=True)
        self.data_dir.chmod(0o700)
        conf = {
            "listen_addresses": "'127.0.0.1'",
            "unix_socket_directories": "''",
            "max_connections": "50",
            "shared_buffers": "32MB",
            "logging_collector": "off",
            # A SIGKILLed server loses nothing that the OS page cache holds:
            # fsync only matters for a crash of the whole machine.
            "fsync": "off",
            **self.settings,
        }
        with (self.data_dir / "postgresql.conf").open("a") as f:
            f.write("\n# gzx private test server\n")
            for key, value in conf.items():
                f.write(f"{key} = {value}\n")
        self._chown()
        self._initialized = True

    @property
    def pid(self) -> int | None:
        """The postmaster's pid while it runs, else None."""
        try:
            first = (self.data_dir / "postmaster.pid").read_text().split("\n", 1)[0]
        except (FileNotFoundError, PermissionError):
            return None
        if not first.strip().isdigit():
            return None
        pid = int(first)
        return pid if _pid_alive(pid) else None

    def is_running(self) -> bool:
        return self.pid is not None

    def is_accepting(self) -> bool:
        """Whether the port accepts TCP connections."""
        return port_is_open(self.port)

    def start(self) -> Self:
        """initdb on first use, then start on self.port and wait until it accepts."""
        if not self._initialized:
            self._initdb()
        if self.is_running():
            return self
        # A lock left by a killed postmaster whose zombie nobody reaps would
        # look like a live server to postgres: clear it.
        with contextlib.suppress(FileNotFoundError):
            (self.data_dir / "postmaster.pid").unlink()
        attempts = 1 if self._port_given else 3
        for attempt in range(attempts):
            result = self._run(
                [
                    str(self.bin_dir / "pg_ctl"),
                    "-D", str(self.data_dir),
                    "-l", str(self.log_file),
                    "-o", f"-p {self.port}",
                    "-w", "-t", str(int(self.startup_timeout)),
                    "start",
                ],
                timeout=self.startup_timeout + 30,
            )  # fmt: skip
            if result.returncode == 0:
                break
            log = _tail(self.log_file)
            port_taken = "could not bind" in log or "Address already in use" in log
            if port_taken and attempt + 1 < attempts:
                self.port = free_port()
                continue
            raise ServerError(
                f"PostgreSQL did not start on port {self.port}: {result.stderr.strip()}\n{log}"
            )
        if not self._db_created:
            self._create_database()
        return self

    def _create_database(self) -> None:
        import psycopg
        from psycopg import sql

        with psycopg.connect(
            f"postgresql://postgres@127.0.0.1:{self.port}/postgres", autocommit=True
        ) as conn:
            exists = conn.execute(
                "SELECT 1 FROM pg_database WHERE datname = %s", (self.dbname,)
            ).fetchone()
            if not exists:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(self.dbname)))
        self._db_created = True

    def stop(self, mode: str = "immediate") -> None:
        """pg_ctl stop -m mode (smart, fast or immediate); a no-op when it is down."""
        pid = self.pid
        if pid is None:
            return
        children = _children(pid)
        result = self._run(
            [str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), "stop", "-m", mode, "-w"],
            timeout=90,
        )
        if result.returncode != 0 and self.is_running():
            raise ServerError(f"pg_ctl stop -m {mode} failed: {result.stderr.strip()}")
        for straggler in _wait_dead(children, 10):
            _signal(straggler, signal.SIGKILL)

    def kill(self) -> None:
        """SIGKILL the postmaster, as a crash would; wait until it and its children are gone.

        The children notice their postmaster's death and exit by themselves;
        any still there after 5 s are killed too, so that a restart finds the
        shared memory free.
        """
        pid = self.pid
        if pid is None:
            return
        children = _children(pid)
        _signal(pid, signal.SIGKILL)
        if _wait_dead([pid], 10):
            raise ServerError(f"postmaster {pid} survived SIGKILL")
        for straggler in _wait_dead(children, 5):
            _signal(straggler, signal.SIGKILL)
        if _wait_dead(children, 5):
            raise ServerError("postgres children survived SIGKILL")

    def restart(self, mode: str = "fast") -> Self:
        self.stop(mode)
        return self.start()

    def cleanup(self) -> None:
        """Stop the server (killing it if need be) and delete its directory."""
        try:
            self.stop("immediate")
        except (ServerError, subprocess.TimeoutExpired):
            self.kill()
        self._finalizer.detach()
        if self._own_base:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    @staticmethod
    def _emergency_cleanup(base_dir: Path, own: bool) -> None:
        # Garbage-collected or interpreter exit without cleanup(): kill, delete.
        with contextlib.suppress(Exception):
            first = (base_dir / "data" / "postmaster.pid").read_text().split("\n", 1)[0]
            pid = int(first)
            if _pid_alive(pid):
                children = _children(pid)
                _signal(pid, signal.SIGKILL)
                _wait_dead([pid], 5)
                for child in _wait_dead(children, 5):
                    _signal(child, signal.SIGKILL)
        if own:
            shutil.rmtree(base_dir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()

    def __repr__(self) -> str:
        state = "running" if self.is_running() else "stopped"
        return f"<PostgresServer {self.url} {state} in {self.base_dir}>"


# -------------------------------------------------------------------- Redis


def find_redis_server() -> Path:
    found = shutil.which("redis-server")
    for candidate in (found, "/usr/bin/redis-server", "/usr/local/bin/redis-server"):
        if candidate and os.access(candidate, os.X_OK):
            return Path(candidate)
    raise ServerUnavailable("redis-server not found on PATH (apt-get install redis-server)")


class RedisServer:
    """A private redis-server: own free port, own temporary directory.

    It runs as a child process of this one (not daemonized), so kill() reaps
    it. ``persistent=True`` turns on the append-only file (fsync always), so
    that data survives kill() and start(); by default nothing is kept.
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        base_dir: str | Path | None = None,
        persistent: bool = False,
        db: int = 0,
        startup_timeout: float = 15.0,
    ) -> None:
        self.binary = find_redis_server()
        self.port = port or free_port()
        self._port_given = port is not None
        self.persistent = persistent
        self.db = db
        self.startup_timeout = startup_timeout
        self._own_base = base_dir is None
        self.base_dir = Path(base_dir or tempfile.mkdtemp(prefix="gzx-redis-"))
        self.log_file = self.base_dir / "redis.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._finalizer = weakref.finalize(
            self, RedisServer._emergency_cleanup, self.base_dir, self._own_base, [None]
        )

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/{self.db}"

    @property
    def pid(self) -> int | None:
        if self._proc is None or self._proc.poll() is not None:
            return None
        return self._proc.pid

    def is_running(self) -> bool:
        return self.pid is not None

    def command(self, *args: str | bytes, timeout: float = 5.0) -> bytes:
        """Send one command over a fresh connection and return the raw reply line."""
        parts = [a.encode() if isinstance(a, str) else a for a in args]
        payload = b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as s:
            s.sendall(payload)
            reply = b""
            while not reply.endswith(b"\r\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                reply += chunk
        return reply.rstrip(b"\r\n")

    def ping(self) -> bool:
        try:
            return self.command("PING", timeout=1.0) == b"+PONG"
        except OSError:
            return False

    def start(self) -> Self:
        """Start redis-server on self.port and wait until it answers PING."""
        if self.is_running():
            return self
        self.base_dir.mkdir(parents=True, exist_ok=True)
        attempts = 1 if self._port_given else 3
        for attempt in range(attempts):
            argv = [
                str(self.binary),
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--daemonize", "no",
                "--save", "",
                "--dir", str(self.base_dir),
                "--logfile", str(self.log_file),
            ]  # fmt: skip
            if self.persistent:
                argv += ["--appendonly", "yes", "--appendfsync", "always"]
            else:
                argv += ["--appendonly", "no"]
            self._proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                cwd=self.base_dir,
            )
            self._finalizer.detach()
            self._finalizer = weakref.finalize(
                self, RedisServer._emergency_cleanup, self.base_dir, self._own_base, [self._proc]
            )
            deadline = time.monotonic() + self.startup_timeout
            while time.monotonic() < deadline:
                if self._proc.poll() is not None:
                    break
                if self.ping():
                    return self
                time.sleep(0.05)
            log = _tail(self.log_file)
            self._reap(signal.SIGKILL)
            if "Address already in use" in log and attempt + 1 < attempts:
                self.port = free_port()
                continue
            raise ServerError(f"redis-server did not start on port {self.port}:\n{log}")
        raise AssertionError("unreachable")

    def _reap(self, sig: int, timeout: float = 15.0) -> None:
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        self._proc = None

    def stop(self) -> None:
        """Shut down cleanly (SIGTERM); a no-op when it is down."""
        self._reap(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL, as a crash would; returns once the process is gone."""
        self._reap(signal.SIGKILL)

    def restart(self) -> Self:
        self.stop()
        return self.start()

    def flushall(self) -> None:
        reply = self.command("FLUSHALL")
        if reply != b"+OK":
            raise ServerError(f"FLUSHALL answered {reply!r}")

    def cleanup(self) -> None:
        self.kill()
        self._finalizer.detach()
        if self._own_base:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    @staticmethod
    def _emergency_cleanup(
        base_dir: Path, own: bool, procs: list[subprocess.Popen[bytes] | None]
    ) -> None:
        for proc in procs:
            if proc is not None and proc.poll() is None:
                proc.kill()
                with contextlib.suppress(Exception):
                    proc.wait(5)
        if own:
            shutil.rmtree(base_dir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()

    def __repr__(self) -> str:
        state = "running" if self.is_running() else "stopped"
        return f"<RedisServer {self.url} {state} in {self.base_dir}>"

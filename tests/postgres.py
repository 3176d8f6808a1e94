"""A throwaway PostgreSQL cluster for tests: Debian's server binaries, a fresh cluster in a temp dir, listening
on 127.0.0.1 only (the superuser `postgres` trusted there, other roles by password; nothing else), stopped and
deleted afterwards.

    with Postgres(tmp_path) as pg:
        uri = pg.create_database("mlflow", owner="mlflow", password="secret")   # postgresql+psycopg2://...

PostgreSQL refuses to run as root: as root the cluster belongs to the `postgres` system user (Debian's package
creates it) and every server command runs through `runuser -u postgres --`. pytest's temp dirs are private to
their owner (mode 0700), so as root the cluster lives in a directory of its own under the system temp dir."""

from __future__ import annotations

import glob
import os
import pwd
import re
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

from tests.conftest import free_port

NOT_INSTALLED = (
    "PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb): `make test` installs it "
    "(scripts/system-packages.sh), or run `apt-get install postgresql`"
)


def find_bindir() -> Path:
    """The bin folder of the newest PostgreSQL under /usr/lib/postgresql (Debian), else the one on PATH."""
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: [int(x) for x in re.findall(r"\d+", Path(p).parent.parent.name)],
    )
    initdb = found[-1] if found else shutil.which("initdb")
    if not initdb or not os.access(initdb, os.X_OK):
        raise RuntimeError(NOT_INSTALLED)
    return Path(initdb).parent


class Postgres:
    superuser = "postgres"

    def __init__(self, tmp_dir: Path) -> None:
        self.bindir = find_bindir()
        self.as_root = os.geteuid() == 0
        if self.as_root:
            try:
                self._owner = pwd.getpwnam("postgres")
            except KeyError:
                raise RuntimeError(
                    "running as root, PostgreSQL needs the `postgres` system user, which Debian's "
                    "postgresql package creates; it is missing"
                ) from None
            self.base = Path(tempfile.mkdtemp(prefix="pytest-postgres-"))
            os.chown(self.base, self._owner.pw_uid, self._owner.pw_gid)
        else:
            self.base = Path(tmp_dir) / "postgres"
            self.base.mkdir(parents=True)
        self.data, self.sockets, self.log = self.base / "data", self.base / "sockets", self.base / "server.log"
        self.host, self.port = "127.0.0.1", free_port()
        self.running = False

    def _run(self, *cmd: str) -> subprocess.CompletedProcess:
        prefix = ["runuser", "-u", "postgres", "--"] if self.as_root else []
        proc = subprocess.run(prefix + list(cmd), cwd=self.base, capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            log = self.log.read_text()[-2000:] if self.log.exists() else ""
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}{log}")
        return proc

    def _write(self, path: Path, text: str) -> None:
        path.write_text(text)
        if self.as_root:
            os.chown(path, self._owner.pw_uid, self._owner.pw_gid)

    def start(self) -> Postgres:
        try:
            self._run(
                str(self.bindir / "initdb"),
                "-D",
                str(self.data),
                "-U",
                self.superuser,
                "--auth=trust",
                "--encoding=UTF8",
                "--no-locale",
                "--no-sync",
            )
            # TCP from 127.0.0.1 only (no unix-socket logins, no other address): the superuser without a
            # password (trust), every other role with its password, as on a real server.
            self._write(
                self.data / "pg_hba.conf",
                f"host all {self.superuser} 127.0.0.1/32 trust\nhost all all 127.0.0.1/32 scram-sha-256\n",
            )
            self._run("mkdir", "-m", "0700", str(self.sockets))
            for attempt in range(3):  # the free port can be taken before the server binds it: pick another
                options = {
                    "listen_addresses": self.host,
                    "port": self.port,
                    "unix_socket_directories": self.sockets,
                    "fsync": "off",
                    "synchronous_commit": "off",
                    "full_page_writes": "off",
                }
                try:
                    self._run(
                        str(self.bindir / "pg_ctl"),
                        "-D",
                        str(self.data),
                        "-l",
                        str(self.log),
                        "-w",
                        "-t",
                        "60",
                        "-o",
                        " ".join(f"-c {k}={shlex.quote(str(v))}" for k, v in options.items()),
                        "start",
                    )
                    break
                except RuntimeError as e:
                    if attempt == 2 or "could not create any TCP/IP sockets" not in str(e):
                        raise
                    self.port = free_port()
            self.running = True
        except BaseException:
            self.stop()
            raise
        return self

    def connect(self, dbname: str = "postgres", user: str | None = None, password: str | None = None):
        import psycopg2

        return psycopg2.connect(
            host=self.host, port=self.port, dbname=dbname, user=user or self.superuser, password=password
        )

    def create_database(self, name: str, *, owner: str | None = None, password: str | None = None) -> str:
        """Create database `name` (and the login role `owner`, when given, as its owner); return its SQLAlchemy
        URI. The driver is named: SQLAlchemy 2.1 reads a bare postgresql:// as psycopg 3, and the project's
        `server` extra installs psycopg2."""
        from psycopg2 import sql

        conn = self.connect()
        conn.autocommit = True  # CREATE DATABASE cannot run in a transaction
        try:
            with conn.cursor() as cur:
                if owner:
                    cur.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD %s").format(sql.Identifier(owner)), [password])
                cur.execute(
                    sql.SQL("CREATE DATABASE {} OWNER {}").format(
                        sql.Identifier(name), sql.Identifier(owner or self.superuser)
                    )
                )
        finally:
            conn.close()
        user = owner or self.superuser
        auth = f"{user}:{password}" if password else user
        return f"postgresql+psycopg2://{auth}@{self.host}:{self.port}/{name}"

    def stop(self) -> None:
        """Stop the server (immediately: the data is thrown away) and delete the cluster."""
        try:
            if (self.data / "postmaster.pid").exists() or self.running:
                self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")
        finally:
            self.running = False
            shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> Postgres:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

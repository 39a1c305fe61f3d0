"""Real servers for tests, on 127.0.0.1 and free ports: SeaweedFS (S3), PostgreSQL, mlflow server.

Each runs in its own process group (``start_new_session``) and is stopped by that group's id,
never by a process name. Nothing here is a mock: the tests talk to the real binaries.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
WEED = BIN / "weed"
PG_BIN = Path("/usr/lib/postgresql/15/bin")
S3_KEY, S3_SECRET, S3_REGION = "sprout-test-key", "sprout-test-secret-0123456789", "us-east-1"
# How sprout starts every MLflow server (cluster/aws.yaml, gcp.yaml, kuberay/mlflow.yaml, `make ui`):
# without MLflow 3's job executor, whose 8 processes sprout never uses. The tests start theirs the same way.
MLFLOW_SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
MLFLOW_JOB_PROCESSES = ("huey_consumer", "mlflow.server.jobs")  # what the job executor runs


def group_pids(pgid: int) -> list[int]:
    """The live processes in process group ``pgid`` (``/proc``; zombies left out)."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            out.append(int(d.name))
    return out


def group_cmdlines(pgid: int) -> list[str]:
    """The command lines of the live processes in process group ``pgid``."""
    out = []
    for pid in group_pids(pgid):
        try:
            out.append(Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip())
        except OSError:
            continue
    return [c for c in out if c]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_ports(n: int) -> list[int]:
    """``n`` distinct free ports (held open together so none is handed out twice)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def stop_group(proc: subprocess.Popen, timeout_s: float = 20.0) -> None:
    """SIGTERM the process group of ``proc`` (its own session), SIGKILL what is left after ``timeout_s``."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(10)


# ----------------------------------------------------------------------------- SeaweedFS


@dataclass
class SeaweedS3:
    """``weed mini``: master, volume, filer and S3 gateway, all bound to 127.0.0.1."""

    data_dir: Path
    buckets: tuple[str, ...] = ("sprout",)
    proc: subprocess.Popen | None = None
    ports: dict[str, int] = field(default_factory=dict)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    def env(self, **extra: str) -> dict[str, str]:
        """The standard client variables for this endpoint (what a cluster user would set)."""
        return {"AWS_ACCESS_KEY_ID": S3_KEY, "AWS_SECRET_ACCESS_KEY": S3_SECRET, "AWS_ENDPOINT_URL": self.endpoint,
                "AWS_REGION": S3_REGION, "AWS_DEFAULT_REGION": S3_REGION, "AWS_EC2_METADATA_DISABLED": "true",
                **extra}

    def start(self, timeout_s: float = 60.0) -> SeaweedS3:
        if not self.ports:  # keep the same ports across a stop/start (a restarted server)
            names = ["master", "master.grpc", "volume", "volume.grpc", "filer", "filer.grpc", "s3", "s3.grpc",
                     "admin", "admin.grpc", "debug", "metrics"]
            self.ports = dict(zip(names, free_ports(len(names))))
        self.data_dir.mkdir(parents=True, exist_ok=True)
        p = self.ports
        cmd = [
            str(WEED), "mini", f"-dir={self.data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={p['master']}", f"-master.port.grpc={p['master.grpc']}",
            f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume.grpc']}",
            f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer.grpc']}",
            f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3.grpc']}", "-s3.port.iceberg=0", "-s3.port.lance=0",
            f"-admin.port={p['admin']}", f"-admin.port.grpc={p['admin.grpc']}", "-admin.ui=false",
            f"-debug.port={p['debug']}", f"-metricsPort={p['metrics']}", "-webdav=false",
            "-s3.autoCreateBucket=false", "-master.telemetry=false",
        ]
        if self.buckets:
            cmd.append("-bucket=" + ",".join(self.buckets))
        env = dict(os.environ, AWS_ACCESS_KEY_ID=S3_KEY, AWS_SECRET_ACCESS_KEY=S3_SECRET)
        log = (self.data_dir.parent / f"{self.data_dir.name}.log").open("ab")
        self.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed mini exited ({self.proc.returncode}); see {log.name}")
            if _port_open(p["s3"]) and self._bucket_ready() and self._data_ready():
                return self
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"weed mini S3 did not answer on {self.endpoint} within {timeout_s:g} s; see {log.name}")

    def _bucket_ready(self) -> bool:
        if not self.buckets:
            return True
        try:
            self.client().head_bucket(Bucket=self.buckets[0])
            return True
        except Exception:  # noqa: BLE001 - not up yet
            return False

    def _data_ready(self) -> bool:
        """Objects can be read and written, not only listed: after a restart the S3 gateway and
        the filer answer before the volume server has re-registered its volumes with the master,
        and until then a GET of an existing object is a 500 (INTERNAL_FAILURE)."""
        if not self.buckets:
            return True
        c, bucket, probe = self.client(), self.buckets[0], ".sprout-test-ready-probe"
        try:
            existing = c.list_objects_v2(Bucket=bucket, MaxKeys=1).get("Contents", [])
            if existing:
                c.get_object(Bucket=bucket, Key=existing[0]["Key"], Range="bytes=0-0")["Body"].read()
            c.put_object(Bucket=bucket, Key=probe, Body=b"ok")
            ok = c.get_object(Bucket=bucket, Key=probe)["Body"].read() == b"ok"
            c.delete_object(Bucket=bucket, Key=probe)
            return ok
        except Exception:  # noqa: BLE001 - not ready yet
            return False

    def stop(self) -> None:
        if self.proc is not None:
            stop_group(self.proc)
            self.proc = None

    def client(self, **overrides: str):
        import boto3
        from botocore.config import Config

        e = self.env()
        return boto3.client(
            "s3", endpoint_url=self.endpoint, aws_access_key_id=overrides.get("key", e["AWS_ACCESS_KEY_ID"]),
            aws_secret_access_key=overrides.get("secret", e["AWS_SECRET_ACCESS_KEY"]), region_name=S3_REGION,
            config=Config(retries={"max_attempts": 1}, connect_timeout=3, read_timeout=10),
        )

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        out: list[str] = []
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        for page in pages:
            out += [o["Key"] for o in page.get("Contents", [])]
        return out


# ----------------------------------------------------------------------------- PostgreSQL


def _service_user() -> str | None:
    """PostgreSQL refuses to run as root: run it as ``postgres`` (Debian's package user) then."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    raise RuntimeError("running as root and neither a 'postgres' nor a 'nobody' user exists")


@dataclass
class Postgres:
    """A throwaway PostgreSQL 15 cluster: initdb into ``base``, pg_ctl on a free port, socket in ``base``."""

    base: Path
    user: str = "mlflow"
    password: str = "mlflow-db-pw"
    database: str = "mlflow"
    auth_database: str = "mlflow_auth"  # the basic-auth app's users and permissions
    port: int = 0

    def uri_of(self, database: str) -> str:
        return f"postgresql+psycopg2://{self.user}:{self.password}@127.0.0.1:{self.port}/{database}"

    @property
    def uri(self) -> str:
        return self.uri_of(self.database)

    @property
    def auth_uri(self) -> str:
        return self.uri_of(self.auth_database)

    def _run(self, *cmd: str) -> subprocess.CompletedProcess:
        user = _service_user()
        full = (["runuser", "-u", user, "--"] if user else []) + list(cmd)
        out = subprocess.run(full, capture_output=True, text=True, timeout=120)
        if out.returncode != 0:
            raise RuntimeError(f"{' '.join(full)} exited {out.returncode}: {out.stderr.strip()[-2000:]}")
        return out

    def start(self) -> Postgres:
        if not (PG_BIN / "initdb").exists():
            raise RuntimeError(f"PostgreSQL 15 binaries not found in {PG_BIN} (apt-get install -y postgresql)")
        self.base.mkdir(parents=True, exist_ok=True)
        data, sock = self.base / "data", self.base / "sock"
        sock.mkdir(exist_ok=True)
        user = _service_user()
        if user:
            shutil.chown(self.base, user)
            shutil.chown(sock, user)
        pwfile = self.base / "pw"
        pwfile.write_text(self.password + "\n")
        if user:
            shutil.chown(pwfile, user)
        self._run(str(PG_BIN / "initdb"), "-D", str(data), "-U", self.user, "--auth=scram-sha-256",
                  f"--pwfile={pwfile}", "-E", "UTF8", "--locale=C")
        self.port = free_port()
        opts = f"-p {self.port} -k {sock} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run(str(PG_BIN / "pg_ctl"), "-D", str(data), "-l", str(self.base / "postgres.log"), "-o", opts,
                  "-w", "-t", "60", "start")
        self._createdb()
        return self

    def _createdb(self) -> None:
        import psycopg2

        conn = psycopg2.connect(host="127.0.0.1", port=self.port, user=self.user, password=self.password,
                                dbname="postgres")
        conn.autocommit = True
        with conn.cursor() as cur:
            for db in (self.database, self.auth_database):
                cur.execute(f"CREATE DATABASE {db}")
        conn.close()

    def stop(self) -> None:
        data = self.base / "data"
        if (data / "postmaster.pid").exists():
            try:
                self._run(str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop")
            except RuntimeError:
                pid = int((data / "postmaster.pid").read_text().split()[0])
                os.kill(pid, signal.SIGKILL)


# ----------------------------------------------------------------------------- mlflow server


@dataclass
class MlflowServer:
    """``mlflow server`` on PostgreSQL, artifacts proxied to S3, MLflow's basic-auth app on."""

    base: Path
    backend_uri: str
    artifacts_destination: str
    s3_env: dict[str, str]
    auth_db_uri: str | None = None  # default: a SQLite file in ``base``
    admin_user: str = "admin"
    admin_password: str = "sprout-admin-pw-0123"
    proc: subprocess.Popen | None = None
    port: int = 0

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [
            str(BIN / "mlflow"), "server", "--backend-store-uri", self.backend_uri,
            "--artifacts-destination", self.artifacts_destination, "--serve-artifacts",
            "--app-name", "basic-auth", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "2",
        ]

    def start(self, timeout_s: float = 180.0) -> MlflowServer:
        self.base.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        auth_ini = self.base / "basic_auth.ini"
        auth_db = self.auth_db_uri or f"sqlite:///{self.base / 'basic_auth.db'}"
        auth_ini.write_text(
            "[mlflow]\n"
            "default_permission = READ\n"
            f"database_uri = {auth_db}\n"
            f"admin_username = {self.admin_user}\n"
            f"admin_password = {self.admin_password}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        )
        env = dict(os.environ, **self.s3_env, **MLFLOW_SERVER_ENV, MLFLOW_AUTH_CONFIG_PATH=str(auth_ini),
                   MLFLOW_FLASK_SERVER_SECRET_KEY="sprout-test-flask-secret")
        for k in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            env.pop(k, None)
        log = (self.base / "mlflow-server.log").open("ab")
        self.proc = subprocess.Popen(self.command(), env=env, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True, cwd=self.base)
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited ({self.proc.returncode}); see {log.name}")
            try:
                with urllib.request.urlopen(self.uri + "/health", timeout=2) as r:  # noqa: S310 - loopback
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"mlflow server did not answer /health within {timeout_s:g} s; see {log.name}")

    def create_user(self, username: str, password: str) -> None:
        """A regular user via the basic-auth app's REST API (as an admin would)."""
        import base64
        import json

        req = urllib.request.Request(  # noqa: S310 - loopback
            self.uri + "/api/2.0/mlflow/users/create", method="POST",
            data=json.dumps({"username": username, "password": password}).encode(),
            headers={"Content-Type": "application/json", "Authorization": "Basic " + base64.b64encode(
                f"{self.admin_user}:{self.admin_password}".encode()).decode()},
        )
        with urllib.request.urlopen(req, timeout=30) as r:  # noqa: S310 - loopback
            assert r.status == 200

    def stop(self) -> None:
        if self.proc is not None:
            stop_group(self.proc)
            self.proc = None

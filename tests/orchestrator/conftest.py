"""Session-scoped real servers shared by the object-storage and production-tracking tests.

Started only when a test asks for them (a session fixture is lazy), on 127.0.0.1 and free
ports, and stopped by their own process group at the end of the session.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from tests.services import MlflowServer, Postgres, SeaweedS3

BUCKET = "sprout"


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory: pytest.TempPathFactory):
    """One SeaweedFS (``weed mini``) S3 endpoint with the bucket ``sprout`` for the session."""
    s = SeaweedS3(tmp_path_factory.mktemp("seaweed") / "weed", buckets=(BUCKET,)).start()
    yield s
    s.stop()


@pytest.fixture(scope="session")
def mlflow_server(seaweed: SeaweedS3):
    """PostgreSQL + ``mlflow server`` with artifacts proxied to ``s3://sprout/mlartifacts`` and basic auth.

    PostgreSQL refuses to run as root, so as root it runs as ``postgres``; its directory is a
    fresh ``/tmp`` folder that user can reach (pytest's tmp root is private to root)."""
    try:
        import flask_wtf  # noqa: F401 - mlflow's basic-auth app imports it at start
    except ImportError:
        pytest.skip("mlflow's basic-auth app needs Flask-WTF (the mlflow[auth] extra), which is not installed")
    base = Path(tempfile.mkdtemp(prefix="sprout-pg-"))
    base.chmod(0o755)
    pg = Postgres(base / "pg")
    try:
        pg.start()
        server = MlflowServer(base / "mlflow", backend_uri=pg.uri,
                              artifacts_destination=f"s3://{BUCKET}/mlartifacts", s3_env=seaweed.env(),
                              auth_db_uri=pg.auth_uri).start()
    except BaseException:
        pg.stop()
        shutil.rmtree(base, ignore_errors=True)
        raise
    yield server, pg
    server.stop()
    pg.stop()
    shutil.rmtree(base, ignore_errors=True)

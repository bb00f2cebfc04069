"""`gzx volunteer forget`: personal fields erased, votes kept (and still counted) as anonymous."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from fastapi.testclient import TestClient
from sqlalchemy import select

from app.models import Classification, Volunteer
from app.pipeline import InProcessDispatcher
from app.service import Service
from tests import payloads as p


def test_forgetting_a_volunteer_erases_them_but_keeps_their_votes(service: Service) -> None:
    """After `gzx volunteer forget 456`, no row holds user id 456 or its login; the votes count."""
    client = TestClient(service.app)
    client.put(f"/v1/workflows/{p.WORKFLOW}", json=p.clump_config())
    client.post(
        "/v1/ingest/kinesis",
        json=p.batch(*(p.event(p.classic(i, 10 + i, 456, 0)) for i in range(1, 4))),
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("GZX_")}
    env["GZX_DATABASE_URL"] = service.settings.database_url
    gzx = str(Path(sys.executable).with_name("gzx"))
    result = subprocess.run(
        [gzx, "volunteer", "forget", "456"], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    with service.sessions() as session:
        volunteers = session.scalars(select(Volunteer)).all()
        assert [v.platform_user_id for v in volunteers] == [None]
        assert [v.login for v in volunteers] == [None]
        assert volunteers[0].key.startswith("forgotten:")
        assert {c.volunteer_id for c in session.scalars(select(Classification))} == {
            volunteers[0].id
        }
    assert isinstance(service.dispatcher, InProcessDispatcher)
    service.dispatcher.wait_idle(30)
    assert client.get(f"/v1/workflows/{p.WORKFLOW}/subjects/11").json()["counts"]["clumpy"] == 1
    again = subprocess.run(
        [gzx, "volunteer", "forget", "456"], env=env, capture_output=True, text=True, timeout=60
    )
    assert again.returncode == 2 and "no volunteer 456" in again.stderr

"""Two ``tensafe serve`` replicas on one PostgreSQL database, one session driven through both, one replica killed.

Needs PostgreSQL (``TENSAFE_TEST_POSTGRES_URL``; ``nox -s server`` starts one):
replicas share a database, which SQLite in one data directory cannot be.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import text

from tensafe.sdk import OperationFailed, TenSafeClient
from tests.mocks.distributions import make_distribution
from tests.mocks.slow_backend import PLUGIN_MODULE, SLOW_BATCH
from tests.serving import POSTGRES_ENV, LiveServer, batch, bigram_config, cli, free_port, reset_postgres

pytestmark = pytest.mark.skipif(
    not os.environ.get(POSTGRES_ENV), reason=f"replicas share a PostgreSQL database: set {POSTGRES_ENV}"
)
LEASE = 3.0


@pytest.fixture
def replicas(tmp_path: Path) -> Iterator[tuple[LiveServer, LiveServer, str, Path]]:
    url = os.environ[POSTGRES_ENV]
    reset_postgres(url)
    plugin_dir = make_distribution(
        tmp_path / "slow-plugin",
        "tensafe-slow",
        "1.0",
        {"slow": "tensafe_slow_plugin"},
        {"tensafe_slow_plugin": PLUGIN_MODULE},
    )
    key_file = tmp_path / "secrets" / "master.key"
    made = cli("keys", "create", "alice", "--master-key-file", str(key_file), data_dir=tmp_path / "a", database=url)
    assert made.returncode == 0, made.stderr
    env = {"TENSAFE_MASTER_KEY_FILE": str(key_file)}
    servers = [
        LiveServer(tmp_path / name, url, free_port(), args=("--lease-seconds", str(LEASE)), env=env)
        for name in ("a", "b")
    ]
    for server in servers:
        server.start(extra_path=plugin_dir)
    try:
        yield servers[0], servers[1], made.stdout.strip(), key_file
    finally:
        for server in servers:
            server.stop()


def test_one_session_through_two_replicas_survives_killing_the_one_that_runs_it(
    replicas: tuple[LiveServer, LiveServer, str, Path],
) -> None:
    a, b, key, key_file = replicas
    config = bigram_config().model_copy(update={"backend": "slow-bigram"})
    with TenSafeClient(a.url, key, max_retries=0) as via_a, TenSafeClient(b.url, key, max_retries=0) as via_b:
        created = via_a.create_training_session(config, sampling_rate=0.01, dataset_size=400)
        on_b = via_b.training_session(created.session_id)
        told, steps = 0.0, 0
        for n in range(1, 5):  # alternate: B hands its calls to A, which runs the session
            first, second = (created, on_b) if n % 2 else (on_b, created)
            first.forward_backward(batch(n)).result(60)
            result = second.optim_step().result(60)
            steps, told = result.step, result.metrics["epsilon"]
        assert steps == 4 and on_b.sample(["record 1"])[0].sequences
        assert [s.session_id for s in via_b.list_sessions()] == [created.session_id]

        # A step in flight on A when A dies.
        running = on_b.forward_backward(batch(5, size=SLOW_BATCH))
        time.sleep(1.0)
        a.kill()
        killed = time.monotonic()
        with pytest.raises(OperationFailed) as caught:
            running.result(60)
        assert caught.value.retryable
        info = on_b.info()
        assert info.step == 4 and info.privacy is not None
        assert info.privacy.epsilon == pytest.approx(told, rel=1e-12)  # nothing charged twice, nothing lost
        on_b.forward_backward(batch(6))
        resumed = on_b.optim_step().result(60)
        moved = time.monotonic() - killed
        assert resumed.step == 5 and resumed.metrics["epsilon"] > told
        assert moved < LEASE + 30, moved
        print(f"session moved to the surviving replica {moved:.1f} s after kill -9 (lease {LEASE:g} s)")
    verify = cli("audit", "verify", "--master-key-file", str(key_file), data_dir=b.data_dir, database=b.database)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    headers = {"Authorization": f"Bearer {key}"}
    assert httpx.get(f"{b.url}/api/v1/audit/verify", headers=headers).json()["ok"] is True


def test_a_replica_that_lost_its_lease_cannot_commit_over_its_successor(
    replicas: tuple[LiveServer, LiveServer, str, Path],
) -> None:
    """Fencing: stale copies of a session refuse to commit once another replica took the session over."""
    from tensafe.server.replicas import LeaseLost
    from tensafe.server.service import SessionService
    from tensafe.testing import fresh_plugin_manager

    a, b, key, key_file = replicas
    with TenSafeClient(b.url, key, max_retries=0) as client:
        session = client.create_training_session(bigram_config(), sampling_rate=0.01, dataset_size=400)
        session.forward_backward(batch(1)).result(60)
        session.optim_step().result(60)
    stale = SessionService(
        a.data_dir.parent / "stale",
        database=a.database,
        plugin_manager=fresh_plugin_manager(autoload=True),
        master_key_file=key_file,
        lease_seconds=LEASE,
    )
    try:
        b.kill()
        time.sleep(LEASE + 0.5)
        with stale.db() as db:
            tenant = db.execute(text("SELECT id FROM tenants")).scalar_one()
        live = stale.holder(tenant, session.session_id)  # takes over the expired lease
        assert live is not None and live.token == 2
        with stale.db() as db:
            db.execute(text("UPDATE session_leases SET owner = 'other', token = 3"))
        live.core.forward_backward(batch(2))
        live.core.optim_step()
        with pytest.raises(LeaseLost), stale.db() as db:
            stale.session_store.commit(db, session.session_id, live, state_changed=True)
        # Any operation, synchronous ones included, takes the manager's path: the copy that moved is evicted.
        with pytest.raises(LeaseLost):
            stale.sessions.run(session.session_id, live, "load_state", lambda: None, state_changed=True)
        assert live.evicted and stale.sessions.get(session.session_id) is None
    finally:
        stale.close()

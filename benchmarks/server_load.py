"""Server load: concurrent clients against ``tensafe serve`` on loopback, against the same calls in-process.

N clients (default 8), each on its own training session of the embedded tiny
torch model with DP-SGD, loop forward_backward -> optim_step -> sample for the
given time, first through ``TenSafeClient()`` in this process (the baseline),
then through ``TenSafeClient(url, key)`` against a live server. Prints p50/p99
latency per call, errors, lost steps (acknowledged steps the server does not
have) and the p50 added per call by the server. Goal: <= 15 ms p50 added.

    python benchmarks/server_load.py [--clients 8] [--seconds 60]
    python benchmarks/server_load.py --replicas 2 --database postgresql://USER:PW@HOST/DB

With ``--replicas N`` (N > 1, on PostgreSQL) the clients are spread over N
replicas of one database, the same load also runs against one replica for
the ratio, and the time a session takes to move to a surviving replica after
a kill -9 of the one running it is measured. Throughput is reported with the
core count: on a machine with fewer cores than replicas there is no scaling
to see, and the test is of correctness.

The server commits every optimizer step (state encrypted on disk, privacy spend
in the database) before answering, so optim_step's added time includes that.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # the same for the baseline and the server process

from tensafe.config import RunConfig, build_config
from tensafe.sdk import TenSafeClient, TrainingSession
from tensafe.types import Datum, SamplingParams, datum_from_sequence

OPS = ("forward_backward", "optim_step", "sample")
SAMPLING = SamplingParams(max_tokens=4, temperature=0.0)


def config() -> RunConfig:
    return build_config(
        {
            "dp": {"noise_multiplier": 1.0, "target_epsilon": None, "target_delta": 1e-5},
            "training": {"batch_size": 4},
            "lora": {"rank": 4},
        },
        environ={},
    )


def batch(session: int, step: int) -> list[Datum]:
    """Four 24-token sequences of ids the tiny model's vocabulary holds."""
    return [datum_from_sequence([(session * 7 + step * 3 + i * 11 + k) % 200 + 3 for k in range(24)]) for i in range(4)]


class Stats:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.latency: dict[str, list[float]] = defaultdict(list)
        self.errors: list[str] = []
        self.acknowledged: dict[str, int] = {}

    def add(self, op: str, seconds: float) -> None:
        with self.lock:
            self.latency[op].append(seconds)


def drive(session: TrainingSession, index: int, seconds: float, stats: Stats) -> None:
    steps, deadline = 0, time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            start = time.perf_counter()
            session.forward_backward(batch(index, steps)).result(300)
            stats.add("forward_backward", time.perf_counter() - start)
            start = time.perf_counter()
            session.optim_step().result(300)
            stats.add("optim_step", time.perf_counter() - start)
            steps += 1
            start = time.perf_counter()
            session.sample(["Q: 1+2? A:"], SAMPLING)
            stats.add("sample", time.perf_counter() - start)
        except Exception as exc:  # every failure is counted and reported, never hidden
            with stats.lock:
                stats.errors.append(f"{type(exc).__name__}: {exc}")
    stats.acknowledged[session.session_id] = steps


def load(clients: list[TenSafeClient], seconds: float) -> tuple[Stats, int]:
    """Run one session per client concurrently; returns stats and the number of lost steps."""
    sessions = [c.create_training_session(config(), sampling_rate=0.004, dataset_size=1000) for c in clients]
    stats = Stats()
    threads = [threading.Thread(target=drive, args=(s, i, seconds, stats)) for i, s in enumerate(sessions)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    lost = sum(max(0, stats.acknowledged[s.session_id] - s.info().step) for s in sessions)
    return stats, lost


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def serve(data_dir: Path, port: int, *extra: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "TENSAFE_DATA_DIR": str(data_dir)}
    process = subprocess.Popen(
        [sys.executable, "-m", "tensafe.cli.main", "serve", "--port", str(port), *extra],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    import httpx

    for _ in range(600):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return process
        except httpx.TransportError:
            time.sleep(0.1)
    process.kill()
    raise SystemExit("server did not start")


LEASE_S = 3.0


def served_by(replicas: int, args: argparse.Namespace, *, measure_move: bool = False) -> tuple[Stats, int, float]:
    """The load against ``replicas`` live servers: stats, lost steps and, with ``measure_move``, the seconds a
    session takes to move to a surviving replica after a kill -9 of the one running it."""
    with tempfile.TemporaryDirectory(prefix="tensafe-bench-") as scratch:
        root = Path(scratch)
        shared: list[str] = ["--lease-seconds", str(LEASE_S)]
        if args.database:
            shared += ["--database", args.database, "--master-key-file", str(root / "master.key")]
        key = subprocess.run(
            [
                sys.executable,
                "-m",
                "tensafe.cli.main",
                "keys",
                "create",
                f"bench-{uuid.uuid4().hex[:8]}",
                "--data-dir",
                str(root / "r0"),
                *shared[2:],
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        ports = [free_port() for _ in range(replicas)]
        servers = [serve(root / f"r{i}", port, *shared) for i, port in enumerate(ports)]
        try:
            remotes = [TenSafeClient(f"http://127.0.0.1:{ports[i % replicas]}", key) for i in range(args.clients)]
            stats, lost = load(remotes, args.seconds)
            moved = float("nan")
            if measure_move:
                session = remotes[0].create_training_session(config(), sampling_rate=0.004, dataset_size=1000)
                session.forward_backward(batch(0, 0)).result(300)
                session.optim_step().result(300)
                other = TenSafeClient(f"http://127.0.0.1:{ports[1]}", key).training_session(session.session_id)
                servers[0].kill()
                servers[0].wait()
                killed = time.monotonic()
                other.forward_backward(batch(0, 1)).result(300)
                other.optim_step().result(300)
                moved = time.monotonic() - killed
            for remote in remotes:
                remote.close()
        finally:
            for server in servers:
                if server.poll() is None:
                    server.terminate()
                    server.wait()
    return stats, lost, moved


def replicated(args: argparse.Namespace) -> None:
    """The same load against one replica and against ``args.replicas`` of one database."""
    if not args.database:
        raise SystemExit("--replicas needs --database postgresql://... (replicas share one database)")
    one, lost_one, _ = served_by(1, args)
    many, lost_many, moved = served_by(args.replicas, args, measure_move=True)
    steps_one = len(one.latency["optim_step"]) / args.seconds
    steps_many = len(many.latency["optim_step"]) / args.seconds
    print(f"replicas: {args.replicas} on one database, {args.clients} clients, {os.cpu_count()} cores")
    print(
        f"steps/s: 1 replica {steps_one:.2f}, {args.replicas} replicas {steps_many:.2f} ({steps_many / steps_one:.2f}x)"
    )
    for op in OPS:
        a, b = pct(one.latency[op], 0.5) * 1000, pct(many.latency[op], 0.5) * 1000
        print(f"{op:<17} p50 1 replica {a:7.1f} ms, {args.replicas} replicas {b:7.1f} ms ({b - a:+.1f} ms)")
    print(f"errors: {len(one.errors)} / {len(many.errors)}; lost steps: {lost_one} / {lost_many}")
    for error in sorted(set(one.errors + many.errors))[:5]:
        print(f"  {error}")
    print(f"session moved to a surviving replica {moved:.1f} s after kill -9 (lease {LEASE_S:g} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--replicas", type=int, default=1, help="Replicas of one PostgreSQL database.")
    parser.add_argument("--database", help="PostgreSQL URL for --replicas (a database of the benchmark's own).")
    args = parser.parse_args()

    if args.replicas > 1:
        replicated(args)
        return
    local = TenSafeClient()
    baseline, baseline_lost = load([local] * args.clients, args.seconds)
    local.close()

    served, served_lost, _ = served_by(1, args)

    print(f"server load: {args.clients} clients x {args.seconds:g} s, tiny torch model, DP-SGD, loopback")
    print(f"{'call':<17}{'in-process p50':>15}{'p99':>9}{'server p50':>12}{'p99':>9}{'added p50':>11}{'n':>7}")
    added = {}
    for op in OPS:
        here, there = baseline.latency[op], served.latency[op]
        added[op] = (pct(there, 0.5) - pct(here, 0.5)) * 1000
        print(
            f"{op:<17}{pct(here, 0.5) * 1000:>13.1f}ms{pct(here, 0.99) * 1000:>7.1f}ms"
            f"{pct(there, 0.5) * 1000:>10.1f}ms{pct(there, 0.99) * 1000:>7.1f}ms{added[op]:>9.1f}ms{len(there):>7}"
        )
        if here and there:
            print(f"{'':<17}ratio server/in-process p50: {statistics.median(there) / statistics.median(here):.2f}x")
    print(f"errors: in-process {len(baseline.errors)}, server {len(served.errors)}")
    for error in sorted(set(baseline.errors + served.errors))[:5]:
        print(f"  {error}")
    print(f"lost steps: in-process {baseline_lost}, server {served_lost}")
    worst = max(added.values())
    print(f"goal <= 15 ms p50 added per call: {'met' if worst <= 15 else 'NOT met'} (worst {worst:.1f} ms)")


if __name__ == "__main__":
    main()

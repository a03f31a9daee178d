"""Server load: concurrent clients against ``tensafe serve`` on loopback, against the same calls in-process.

N clients (default 8), each on its own training session of the embedded tiny
torch model with DP-SGD, loop forward_backward -> optim_step -> sample for the
given time, first through ``TenSafeClient()`` in this process (the baseline),
then through ``TenSafeClient(url, key)`` against a live server. Prints p50/p99
latency per call, errors, lost steps (acknowledged steps the server does not
have) and the p50 added per call by the server. Goal: <= 15 ms p50 added.

    python benchmarks/server_load.py [--clients 8] [--seconds 60]

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


def serve(data_dir: Path, port: int) -> subprocess.Popen[bytes]:
    env = {**os.environ, "TENSAFE_DATA_DIR": str(data_dir)}
    process = subprocess.Popen(
        [sys.executable, "-m", "tensafe.cli.main", "serve", "--port", str(port)],
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=60.0)
    args = parser.parse_args()

    local = TenSafeClient()
    baseline, baseline_lost = load([local] * args.clients, args.seconds)
    local.close()

    with tempfile.TemporaryDirectory(prefix="tensafe-bench-") as scratch:
        data_dir, port = Path(scratch), free_port()
        key = subprocess.run(
            [sys.executable, "-m", "tensafe.cli.main", "keys", "create", "bench", "--data-dir", str(data_dir)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        server = serve(data_dir, port)
        try:
            remotes = [TenSafeClient(f"http://127.0.0.1:{port}", key) for _ in range(args.clients)]
            served, served_lost = load(remotes, args.seconds)
            for remote in remotes:
                remote.close()
        finally:
            server.terminate()
            server.wait()

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

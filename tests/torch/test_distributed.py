"""Multi-process DP training (gloo on CPU), through the user's door: `tensafe train --nproc-per-node N` and torchrun.

DP across workers must be exactly DP on one: the same update on the same
batches, the noise added once to the summed gradient, one accountant charge
per step on the leader, the budget's refusal reaching every worker, and a
dead worker stopping the run with a checkpoint that resumes at another world size.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from tensafe.config import DPConfig, RunConfig
from tensafe.engine.workers import ShardSampler
from tensafe.types import AdamParams, datum_from_sequence
from tensafe_torch.backend import TorchBackend
from tensafe_torch.loading import resolve_device
from tests.torch import distributed_noise_worker as noise_worker

ROOT = Path(__file__).resolve().parents[2]
BASE: dict[str, Any] = {
    "training": {"steps": 3, "batch_size": 16, "micro_batch_size": 8, "checkpoint_every": 0, "worker_timeout_s": 60},
    "data": {"max_records": 120},
    "lora": {"rank": 4},
}


def _config(tmp_path: Path, name: str, **sections: Any) -> Path:
    config = {**BASE, **{k: {**BASE.get(k, {}), **v} for k, v in sections.items()}}
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(config), encoding="utf-8")
    return path


def _env() -> dict[str, str]:
    launcher = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")
    return {k: v for k, v in os.environ.items() if not k.startswith("TENSAFE_") and k not in launcher}


def tensafe(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tensafe", *args], cwd=cwd, env=_env(), capture_output=True, text=True, timeout=300
    )


def _train(tmp_path: Path, config: Path, name: str, *launch: str) -> dict[str, Any]:
    result = tensafe(
        "train", str(config), "--output-dir", str(tmp_path), "--run-name", name, "--json", *launch, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    report: dict[str, Any] = json.loads(result.stdout)
    assert report["status"] == "completed"
    # The leader alone announces the run and draws the progress bar.
    assert sum(line.startswith(("DP-SGD:", "training without")) for line in result.stderr.splitlines()) == 1
    return report


def _adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


# -- the same run on one worker and on two ---------------------------------------------


def test_two_workers_apply_the_update_of_one_worker_without_noise(tmp_path: Path) -> None:
    config = _config(tmp_path, "plain", dp={"enabled": False})
    one = _train(tmp_path, config, "one", "--nproc-per-node", "1")
    two = _train(tmp_path, config, "two", "--nproc-per-node", "2")

    assert (one["workers"], two["workers"]) == (1, 2)
    # One global Poisson sample: the same batches at either world size, their measures summed over the workers.
    assert [h["batch_size"] for h in one["history"]] == [h["batch_size"] for h in two["history"]]
    for a, b in zip(one["history"], two["history"], strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
    first, second = _adapter(tmp_path / "one"), _adapter(tmp_path / "two")
    assert max(float(first[k].abs().max()) for k in first if "lora_B" in k) > 1e-3  # the adapter moved
    for key in first:
        torch.testing.assert_close(second[key], first[key], rtol=1e-4, atol=1e-6)
    # Only the leader writes: one report, one checkpoint, one adapter, in the run directory it was given.
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["one", "two"]
    assert (tmp_path / "two" / "checkpoint" / "progress.json").is_file()


def test_dp_on_two_workers_charges_what_one_worker_charges(tmp_path: Path) -> None:
    config = _config(tmp_path, "dp", dp={"target_epsilon": 8.0, "secure_rng": False})
    two = _train(tmp_path, config, "two", "--nproc-per-node", "2")
    one = _train(tmp_path, config, "one")  # the plain single-process run of the same config

    assert two["privacy"]["epsilon"] == one["privacy"]["epsilon"]
    assert two["privacy"]["noise_multiplier"] == one["privacy"]["noise_multiplier"]
    # One charge per step, on the leader alone; under DP a step releases its epsilon, not its batch.
    assert [h["epsilon"] for h in two["history"]] == [h["epsilon"] for h in one["history"]]
    assert all(set(h) == {"step", "epsilon"} for h in two["history"])
    progress = json.loads((tmp_path / "two" / "checkpoint" / "progress.json").read_text(encoding="utf-8"))
    assert progress["step"] == 3 and progress["rng"] is None  # the step-keyed sampler keeps no state


def test_the_budget_refusal_reaches_every_worker_before_the_step(tmp_path: Path) -> None:
    config = _config(tmp_path, "budget", dp={"target_epsilon": 5.0, "noise_multiplier": 0.56})
    result = tensafe(
        "train", str(config), "--output-dir", str(tmp_path), "--run-name", "b", "--nproc-per-node", "2", cwd=tmp_path
    )
    assert result.returncode == 3, result.stderr
    assert "privacy budget" in result.stderr and "Traceback" not in result.stderr
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .endswith("stopped with the error above (exit status 3), so the run stopped")
    )
    report = json.loads((tmp_path / "b" / "report.json").read_text(encoding="utf-8"))
    assert report["status"] == "failed"
    steps = report["steps"]
    assert 0 < steps < 3 and report["privacy"]["epsilon"] <= 5.0
    progress = json.loads((tmp_path / "b" / "checkpoint" / "progress.json").read_text(encoding="utf-8"))
    assert progress["step"] == steps  # the refused step ran nowhere and was charged nowhere


def test_noise_is_added_once_to_the_summed_gradient(tmp_path: Path) -> None:
    # Empty batches on both workers: what each applies is the step's noise alone, over the expected batch size.
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            str(Path(noise_worker.__file__)),
            str(tmp_path),
        ],
        cwd=ROOT,
        env={**_env(), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    leader = json.loads((tmp_path / "rank-0.json").read_text(encoding="utf-8"))
    other = json.loads((tmp_path / "rank-1.json").read_text(encoding="utf-8"))
    assert leader == other  # every worker applies the one noised gradient
    values = [v for step in leader for v in step]
    assert len(values) > 100_000
    once = noise_worker.SIGMA * noise_worker.CLIP / noise_worker.BATCH
    # Twice-added noise would show sqrt(2) times this: 41% more, against a 1% tolerance.
    assert statistics.pstdev(values) == pytest.approx(once, rel=0.01)
    assert abs(statistics.fmean(values)) < 0.01 * once


# -- a worker that dies ----------------------------------------------------------------


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, queue = [], [pid]
    while queue:
        for child in children.get(queue.pop(), []):
            found.append(child)
            queue.append(child)
    return found


def _wait_for(condition: Any, seconds: float = 180) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def _worker_pid(launcher: int, rank: int) -> int | None:
    for pid in _descendants(launcher):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ and b"TORCHELASTIC_RUN_ID" in b"".join(environ):
            return pid
    return None


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the worker to kill through /proc")
def test_a_killed_worker_stops_the_run_and_its_checkpoint_resumes_on_one_worker(tmp_path: Path) -> None:
    config = _config(tmp_path, "kill", dp={"target_epsilon": 50.0}, training={"steps": 400, "checkpoint_every": 2})
    command = [sys.executable, "-m", "tensafe", "train", str(config), "--output-dir", str(tmp_path)]
    launcher = subprocess.Popen(
        [*command, "--run-name", "k", "--nproc-per-node", "2"],
        cwd=tmp_path,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    progress = tmp_path / "k" / "checkpoint" / "progress.json"
    _wait_for(lambda: progress.is_file() or launcher.poll() is not None)
    victim = _worker_pid(launcher.pid, rank=1)
    assert victim is not None and launcher.poll() is None
    os.kill(victim, signal.SIGKILL)
    _, stderr = launcher.communicate(timeout=120)

    assert launcher.returncode == 1
    assert "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("error: training worker rank 1 was killed by SIGKILL, so the run stopped")
    assert f"resume with `tensafe train --resume {tmp_path / 'k'}`" in last
    saved = json.loads(progress.read_text(encoding="utf-8"))
    assert 0 < saved["step"] < 400
    # The leader stopped at a collective, whole: its report and its last checkpoint agree on the steps taken.
    failed = json.loads((tmp_path / "k" / "report.json").read_text(encoding="utf-8"))
    assert failed["status"] == "failed" and failed["steps"] == saved["step"]
    assert failed["error"].startswith(("lost the run's other workers", "stopped by the launcher (SIGTERM)"))

    # Resumed on one worker (no launcher), for two more steps: the spend continues from the checkpoint's.
    target = saved["step"] + 2
    result = tensafe(
        "train", str(config), "--resume", str(tmp_path / "k"), "--steps", str(target), "--json", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["status"] == "completed" and report["steps"] == target
    assert [h["step"] for h in report["history"]] == list(range(1, target + 1))
    assert report["privacy"]["epsilon"] > saved["history"][-1]["epsilon"]


def test_a_hung_worker_stops_the_run_after_the_collective_timeout(tmp_path: Path) -> None:
    training = {"steps": 400, "checkpoint_every": 2, "worker_timeout_s": 3}
    config = _config(tmp_path, "hang", dp={"target_epsilon": 50.0}, training=training)
    command = [sys.executable, "-m", "tensafe", "train", str(config), "--output-dir", str(tmp_path)]
    launcher = subprocess.Popen(
        [*command, "--run-name", "h", "--nproc-per-node", "2"],
        cwd=tmp_path,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    run_dir = tmp_path / "h"
    _wait_for(lambda: (run_dir / "checkpoint" / "progress.json").is_file() or launcher.poll() is not None)
    victim = _worker_pid(launcher.pid, rank=1)
    assert victim is not None and launcher.poll() is None
    os.kill(victim, signal.SIGSTOP)  # alive, and silent
    try:
        report = run_dir / "report.json"
        _wait_for(lambda: report.is_file() and '"failed"' in report.read_text(encoding="utf-8"))
    finally:
        os.kill(victim, signal.SIGCONT)  # so that the launcher's stop reaches it
    _, stderr = launcher.communicate(timeout=120)

    assert launcher.returncode == 1
    failed = json.loads(report.read_text(encoding="utf-8"))
    assert failed["error"].startswith("lost the run's other workers during") and "3000ms" in failed["error"]
    # The leader times out first; the resumed victim may then fail its own collective and be the one the
    # launcher names, whichever exit it sees first: either way one line, exit status 1, the checkpoint to resume.
    last = stderr.strip().splitlines()[-1]
    assert last.startswith(("error: training worker rank 0 exited with status 1", "error: training worker rank 1 "))
    assert f"--resume {run_dir}" in last
    assert json.loads((run_dir / "checkpoint" / "progress.json").read_text(encoding="utf-8"))["step"] == failed["steps"]


def test_launch_mistakes_are_one_line_errors(tmp_path: Path) -> None:
    nodes = tensafe("train", "--nproc-per-node", "2", "--nnodes", "2", cwd=tmp_path)
    assert nodes.returncode == 2
    assert nodes.stderr.strip() == (
        "error: a run on several nodes needs --rdzv-endpoint HOST:PORT, the same on every node"
    )
    alone = tensafe("train", "--nnodes", "2", cwd=tmp_path)
    assert alone.returncode == 2
    assert alone.stderr.strip() == "error: --nnodes and --rdzv-endpoint go with --nproc-per-node"
    assert not any(tmp_path.iterdir())


# -- the pieces, in-process ------------------------------------------------------------


def test_shards_partition_one_global_poisson_sample_at_any_world_size() -> None:
    n, q = 1000, 0.1
    for step in (1, 2, 17):
        alone = ShardSampler(n, q, rank=0, world_size=1, seed=7).sample(step)
        shards = [ShardSampler(n, q, rank=r, world_size=3, seed=7).sample(step) for r in range(3)]
        assert sorted(i for shard in shards for i in shard) == alone
        assert all(i % 3 == r for r, shard in enumerate(shards) for i in shard)
    sizes = [len(ShardSampler(n, q, rank=0, world_size=1, seed=7).sample(step)) for step in range(1, 201)]
    assert statistics.fmean(sizes) == pytest.approx(n * q, rel=0.05)
    assert len(set(map(tuple, (ShardSampler(n, q, rank=0, world_size=1, seed=None).sample(1) for _ in range(3))))) == 3


def test_device_auto_is_the_cpu_without_cuda() -> None:
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected


def test_bfloat16_autocast_keeps_lora_weights_and_noise_in_float32() -> None:
    config = RunConfig(
        backend="torch",
        model={"dtype": "bfloat16", "device": "cpu"},
        dp=DPConfig(target_epsilon=None, noise_multiplier=1.0, secure_rng=False),
        training={"batch_size": 2, "seed": 0},
        lora={"rank": 4, "seed": 0},
    )
    backend = TorchBackend(share_base=False)
    backend.initialize_model(config)
    assert backend._autocast is torch.bfloat16
    assert {p.dtype for p in backend._params} == {torch.float32}
    assert any(p.dtype == torch.bfloat16 for p in backend._peft.parameters() if not p.requires_grad)
    datum = datum_from_sequence(backend.encode("Record 1. Name: Ada. City: Lyon."), 0)
    seen: list[torch.dtype] = []
    hook = backend._peft.get_base_model().lm_head.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    backend.forward_backward([datum, datum], "cross_entropy")
    hook.remove()
    assert seen == [torch.bfloat16]  # the forward pass ran in half precision
    assert {p.summed_grad.dtype for p in backend._params} == {torch.float32}
    backend.optim_step(AdamParams(learning_rate=1e-3))
    assert {p.grad.dtype for p in backend._params} == {torch.float32}  # clipped sum + noise, in float32
    assert {p.dtype for p in backend._params} == {torch.float32}

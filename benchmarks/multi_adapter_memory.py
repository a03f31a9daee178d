"""Memory of many training sessions of one base model, with the base shared and with a copy per session.

Each session is a torch backend (``TorchBackend``) initialised as a training
session is, on the embedded tiny Llama (or ``--model DIR``), with DP-SGD
(``dp.clipping: lora``), that has taken one step, so that its AdamW moments and
DP sums exist. Sessions are added one by one up to 32; at 1, 8 and 32 the
script records the process's resident set (after a garbage collection and
``malloc_trim``, with glibc told to map every allocation of 64 KiB or more on
its own, so that memory freed by the sessions' forward and backward passes
leaves the resident set) and the bytes of the distinct tensor storages
all sessions hold (a storage several sessions share counts once). It runs
twice, each in a child process of its own: with the base shared (the default)
and with ``TENSAFE_TORCH_SHARE_BASE=0`` (a private copy per session, the
baseline).

The goal (issue 16): each added session costs at most its adapter + its
optimizer state + 10% of the base model's bytes. Printed per mode: the
resident set and tensor bytes at 1, 8 and 32 sessions, the cost of each added
session (from 1 to 8 and from 1 to 32) against that budget, and the shared
mode's totals as a fraction of the baseline's. A session's tensors beyond the
budget's are its DP-SGD sums and gradients (``summed_grad``, ``grad``, each
an adapter's size), listed as "DP state".

``--synthetic`` measures a larger model as well: the embedded model's
architecture and tokenizer widened to 512 and deepened to 8 layers (about 100
MB of float32 weights), written to a temporary directory with seeded random
weights. Memory does not depend on the weights' values, and the embedded
model is so small (4 MiB) that 10% of it is less than one session's Python
objects (its module tree, PEFT's and Opacus' bookkeeping: about 1 MiB).

    python benchmarks/multi_adapter_memory.py [--model DIR | --synthetic] [--rank R]
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import subprocess
import sys
from typing import Any

COUNTS = (1, 8, 32)
MMAP_THRESHOLD = 1 << 16
MODES = {"shared": "1", "private": "0"}


def _rss() -> int:
    """The resident set once glibc has handed its free heap pages back (what the live objects occupy)."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/statm", encoding="ascii") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _nbytes(tensors: Any) -> int:
    return sum(int(t.numel() * t.element_size()) for t in tensors)


def measure(model: str | None, rank: int) -> dict[str, Any]:
    """Add sessions one by one; the resident set and tensor bytes at each of COUNTS."""
    import torch

    from tensafe.config import DPConfig, RunConfig
    from tensafe.types import AdamParams, datum_from_sequence
    from tensafe_torch.backend import TorchBackend
    from tensafe_torch.shared_base import tensor_bytes

    torch.set_num_threads(1)
    config = RunConfig(
        backend="torch",
        model={"path": model},
        dp=DPConfig(noise_multiplier=1.0, target_epsilon=None, clipping="lora"),
        training={"batch_size": 4},
        lora={"rank": rank},
    )
    sessions: list[TorchBackend] = []
    points: dict[int, dict[str, int]] = {}
    while len(sessions) < COUNTS[-1]:
        backend = TorchBackend()
        backend.initialize_model(config)
        tokens = [*backend.encode("Record 7: the harbour master's log"), 0]
        backend.forward_backward([datum_from_sequence(tokens, prompt_length=1)] * 4, "cross_entropy")
        backend.optim_step(AdamParams(learning_rate=1e-3))
        sessions.append(backend)
        if len(sessions) in COUNTS:
            extra = [
                t
                for b in sessions
                for p in b._params
                for t in (p.grad, getattr(p, "summed_grad", None), *b._optimizer.state[p].values())
                if isinstance(t, torch.Tensor)
            ]
            points[len(sessions)] = {"rss": _rss(), "tensors": tensor_bytes([b._peft for b in sessions], extra)}
    first = sessions[0]
    params = first._params
    moments = [t for p in params for k, t in first._optimizer.state[p].items() if k != "step"]
    dp_state = [t for p in params for t in (p.grad, p.summed_grad) if t is not None]
    return {
        "points": points,
        "adapter": _nbytes(params),
        "optimizer": _nbytes(moments),
        "dp_state": _nbytes(dp_state),
        "base": tensor_bytes([first._frozen_base._model]),
    }


def _child(mode: str, model: str | None, rank: int) -> dict[str, Any]:
    env = {**os.environ, "TENSAFE_TORCH_SHARE_BASE": MODES[mode], "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)}
    command = [sys.executable, __file__, "--child", "--rank", str(rank), *(["--model", model] if model else [])]
    out = subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    result["points"] = {int(k): v for k, v in result["points"].items()}
    return result


def _mib(value: float) -> str:
    return f"{value / 2**20:8.2f} MiB"


def report(results: dict[str, dict[str, Any]]) -> None:
    some = results["shared"]
    budget = some["adapter"] + some["optimizer"] + 0.1 * some["base"]
    print(
        f"base model {_mib(some['base'])}; per session: adapter {_mib(some['adapter'])}, "
        f"AdamW moments {_mib(some['optimizer'])}, DP state {_mib(some['dp_state'])}"
    )
    print(f"goal per added session: adapter + optimizer + 10% of the base = {_mib(budget)}")
    for mode, result in results.items():
        points = result["points"]
        print(f"\n{mode} base")
        for count in COUNTS:
            print(
                f"  {count:3d} sessions: resident {_mib(points[count]['rss'])}, "
                f"tensors {_mib(points[count]['tensors'])}"
            )
        for count in COUNTS[1:]:
            for kind in ("rss", "tensors"):
                added = (points[count][kind] - points[1][kind]) / (count - 1)
                verdict = "meets" if added <= budget else "misses"
                print(
                    f"  added session (1->{count}), {kind:7s}: {_mib(added)} = "
                    f"{added / budget:5.2f}x the goal ({verdict})"
                )
    shared, private = results["shared"]["points"], results["private"]["points"]
    print("\nshared / private")
    for count in COUNTS:
        print(
            f"  {count:3d} sessions: resident {shared[count]['rss'] / private[count]['rss']:5.2f}x, "
            f"tensors {shared[count]['tensors'] / private[count]['tensors']:5.2f}x"
        )


def write_synthetic(directory: str) -> str:
    """The embedded model's architecture, widened and deepened, with seeded random weights; returns its path."""
    import shutil

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from tensafe_torch import assets

    config = AutoConfig.from_pretrained(str(assets.TINY_MODEL))
    config.update({"hidden_size": 512, "intermediate_size": 1376, "num_hidden_layers": 8, "num_attention_heads": 8})
    config.update({"num_key_value_heads": 8, "head_dim": 64})
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(assets.TINY_MODEL / name, directory)
    return directory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a local model directory (default: the embedded tiny Llama)")
    parser.add_argument("--synthetic", action="store_true", help="a larger model with random weights (see above)")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank (default 8)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.model, args.rank)))
        return
    if args.synthetic:
        import tempfile

        with tempfile.TemporaryDirectory() as directory:
            model = write_synthetic(directory)
            report({mode: _child(mode, model, args.rank) for mode in MODES})
        return
    report({mode: _child(mode, args.model, args.rank) for mode in MODES})


if __name__ == "__main__":
    main()

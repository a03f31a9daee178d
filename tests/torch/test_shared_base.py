"""Sessions of one base model share its frozen weights; their adapters, gradients, clipping and noise stay their own."""

from __future__ import annotations

import gc
import threading
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pytest
import torch

from tensafe.config import DPConfig, RunConfig
from tensafe.errors import UsageError
from tensafe.types import AdamParams, Datum, SamplingParams, datum_from_sequence
from tensafe_torch.backend import TorchBackend
from tensafe_torch.shared_base import SHARE_ENV, tensor_bytes
from tests.torch.test_dp import perturb_lora_b

T = TypeVar("T")
ADAM = AdamParams(learning_rate=0.05)
STEPS = 3
#: Two sessions' training text: what each learns must stay out of the other's adapter.
TEXTS = {
    1: ["Record 3: the lighthouse keeper rows out at dawn", "a short one", "tide tables printed every spring"],
    2: ["Python evaluates expressions from left to right", "ok then", "the northern harbour freezes in winter"],
}


def config(seed: int, **dp: Any) -> RunConfig:
    """A session's config; with ``dp``, DP-SGD whose noise is keyed by ``seed`` (reproducible, not private)."""
    dp_config = DPConfig(**{"target_epsilon": None, "secure_rng": False, **dp}) if dp else DPConfig(enabled=False)
    return RunConfig(
        backend="torch", dp=dp_config, training={"batch_size": 3, "seed": seed}, lora={"rank": 4, "seed": seed}
    )


def start(seed: int, *, share_base: bool = True, **dp: Any) -> TorchBackend:
    backend = TorchBackend(share_base=share_base)
    backend.initialize_model(config(seed, **dp))
    return backend


def data_for(backend: TorchBackend, seed: int) -> list[Datum]:
    return [datum_from_sequence([*backend.encode(text), 0], prompt_length=1) for text in TEXTS[seed]]


def train(backend: TorchBackend, seed: int, between: Callable[[], object] = lambda: None) -> None:
    """``STEPS`` steps on the session's own data, two micro-batches each; ``between`` runs between calls."""
    data = data_for(backend, seed)
    for _ in range(STEPS):
        backend.forward_backward(data[:2], "cross_entropy")
        between()
        backend.forward_backward(data[2:], "cross_entropy")
        between()
        backend.optim_step(ADAM)
        between()


def adapter(backend: TorchBackend) -> dict[str, torch.Tensor]:
    return {name: param.detach().clone() for name, param in zip(backend._names, backend._params, strict=True)}


def frozen(backend: TorchBackend) -> list[torch.nn.Parameter]:
    return [param for param in backend._peft.parameters() if not param.requires_grad]


def in_threads(*work: Callable[[], T], barrier: threading.Barrier | None = None) -> list[T]:
    """Run each callable on a thread of its own, all at once; re-raise the first failure.

    A failure breaks ``barrier``, which the others may be waiting at.
    """
    results: list[Any] = [None] * len(work)
    errors: list[BaseException] = []

    def run(index: int) -> None:
        try:
            results[index] = work[index]()
        except BaseException as exc:  # re-raised on the test's thread
            errors.append(exc)
            if barrier is not None:
                barrier.abort()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(work))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise next((e for e in errors if not isinstance(e, threading.BrokenBarrierError)), errors[0])
    return results


def assert_same(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        assert torch.equal(actual[name], expected[name]), name


def test_two_sessions_share_the_base_weights_and_count_them_once() -> None:
    first, second = start(1), start(2)
    own = start(1, share_base=False)
    pairs = list(zip(frozen(first), frozen(second), frozen(own), strict=True))
    assert pairs
    assert all(a.data_ptr() == b.data_ptr() for a, b, _ in pairs)
    assert all(a.data_ptr() != c.data_ptr() for a, _, c in pairs)
    # Each session has its own module tree (so its own LoRA layers) over the shared tensors.
    assert first._peft.get_base_model() is not second._peft.get_base_model()
    assert not {id(p) for p in first._params} & {id(p) for p in second._params}
    base = tensor_bytes([first._frozen_base._model])
    adapters = [sum(p.numel() * p.element_size() for p in b._params) for b in (first, second)]
    assert tensor_bytes([first._peft, second._peft]) == base + sum(adapters)
    assert tensor_bytes([first._peft, own._peft]) == 2 * base + sum(adapters)


@pytest.mark.parametrize("clipping", ["lora", "hooks"])
def test_concurrent_sessions_train_exactly_the_adapters_they_train_alone(clipping: str) -> None:
    dp = {"noise_multiplier": 0.5, "max_grad_norm": 0.05, "clipping": clipping}  # clips every datum; noise on
    alone = {}
    for seed in (1, 2):
        backend = start(seed, share_base=False, **dp)
        perturb_lora_b(backend)
        train(backend, seed)
        alone[seed] = adapter(backend)
    assert not torch.equal(alone[1][next(iter(alone[1]))], alone[2][next(iter(alone[2]))])
    sessions = {seed: start(seed, **dp) for seed in (1, 2)}
    for backend in sessions.values():
        perturb_lora_b(backend)
    # Lock-step: each call of one session happens between two calls of the other.
    barrier = threading.Barrier(2, timeout=120)
    in_threads(*(lambda seed=seed: train(sessions[seed], seed, barrier.wait) for seed in (1, 2)), barrier=barrier)
    for seed in (1, 2):
        assert_same(adapter(sessions[seed]), alone[seed])


@pytest.mark.parametrize("clipping", ["lora", "hooks"])
def test_a_shared_sessions_clipped_sum_is_the_unshared_ones(clipping: str) -> None:
    dp = {"noise_multiplier": 1.0, "max_grad_norm": 0.05, "clipping": clipping}
    shared, other, private = start(1, **dp), start(2, **dp), start(1, share_base=False, **dp)
    for backend in (shared, other, private):
        perturb_lora_b(backend)
    shared.forward_backward(data_for(shared, 1), "cross_entropy")
    other.forward_backward(data_for(other, 2), "cross_entropy")  # after, and on the same weights
    private.forward_backward(data_for(private, 1), "cross_entropy")
    sums = [torch.cat([p.summed_grad.flatten() for p in b._params]) for b in (shared, other, private)]
    assert float(sums[0].norm()) > 0
    assert torch.equal(sums[0], sums[2])
    assert not torch.equal(sums[0], sums[1])
    assert all(p.grad is None and getattr(p, "grad_sample", None) is None for p in frozen(shared))


def test_concurrent_sampling_sees_only_the_sessions_own_adapter() -> None:
    sessions = {seed: start(seed) for seed in (1, 2)}
    for seed, backend in sessions.items():
        train(backend, seed)
    greedy = SamplingParams(max_tokens=12, temperature=0.0)
    prompts = {seed: [backend.encode(TEXTS[seed][0])[:3]] for seed, backend in sessions.items()}

    def sample(seed: int) -> list[int]:
        return sessions[seed].sample(prompts[seed], greedy)[0].sequences[0].tokens

    alone = {seed: sample(seed) for seed in (1, 2)}
    for _ in range(3):
        assert in_threads(lambda: sample(1), lambda: sample(2)) == [alone[1], alone[2]]


def test_one_sessions_save_and_load_leave_the_other_alone() -> None:
    first, second = start(1, noise_multiplier=0.5), start(2, noise_multiplier=0.5)
    train(first, 1)
    train(second, 2)
    saved, second_before = first.save_state(), adapter(second)
    second_state = second.save_state()
    first_before = adapter(first)
    train(first, 1)
    assert first.load_state(saved) == STEPS
    assert_same(adapter(first), first_before)
    assert_same(adapter(second), second_before)
    assert second.save_state() == second_state


def test_training_never_changes_or_grades_the_shared_base() -> None:
    backend = start(1, noise_multiplier=0.5)
    before = [p.detach().clone() for p in frozen(backend)]
    train(backend, 1)
    after = frozen(backend)
    assert all(not p.requires_grad and p.grad is None for p in after)
    assert all(torch.equal(a, b) for a, b in zip(after, before, strict=True))


def test_the_shared_base_is_freed_with_its_last_session() -> None:
    sessions = [start(1), start(2)]
    base = weakref.ref(sessions[0]._frozen_base)
    assert sessions[1]._frozen_base is base()
    sessions.pop()
    gc.collect()
    assert base() is not None
    sessions.clear()
    gc.collect()
    assert base() is None
    assert start(1)._frozen_base is not None


@pytest.mark.parametrize(("value", "shared"), [("0", False), ("off", False), ("1", True), ("", True)])
def test_the_environment_switches_sharing(monkeypatch: pytest.MonkeyPatch, value: str, shared: bool) -> None:
    monkeypatch.setenv(SHARE_ENV, value)
    first, second = TorchBackend(), TorchBackend()
    for backend in (first, second):
        backend.initialize_model(config(1))
    pointers: Sequence[set[int]] = [{p.data_ptr() for p in frozen(b)} for b in (first, second)]
    assert (pointers[0] == pointers[1]) is shared


def test_an_unclear_switch_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SHARE_ENV, "maybe")
    with pytest.raises(UsageError, match=SHARE_ENV):
        TorchBackend().initialize_model(config(1))


def test_loading_an_adapter_replaces_only_the_sessions_own(tmp_path: Path) -> None:
    trained, loader, bystander = start(1), start(2), start(2)
    train(trained, 1)
    trained.export_adapter(tmp_path)
    before = adapter(bystander)
    loader.load_adapter(tmp_path)
    assert_same(adapter(loader), adapter(trained))
    assert_same(adapter(bystander), before)
    assert {p.data_ptr() for p in frozen(loader)} == {p.data_ptr() for p in frozen(bystander)}

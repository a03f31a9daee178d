"""The torch backend's training step: gradients accumulated per micro-batch, then one DP-SGD or AdamW step.

Under DP each micro-batch's per-datum gradients are clipped and added to a
running sum; ``optim_step`` adds the step's noise once, divides by the expected
batch size and steps AdamW. In a run of several workers (``join_workers``) the
clipped sums of all workers are summed on worker 0, which alone adds the noise,
and the noised sum is broadcast: every worker applies the same update, and the
noise is that of one process however many there are.
"""

from __future__ import annotations

import bisect
import itertools
import math
import warnings
from collections.abc import Mapping, Sequence

import torch

from tensafe.errors import BackendError
from tensafe.types import AdamParams, Datum, ForwardBackwardOutput, LossFnType, OptimStepResponse

#: Most per-sample gradient elements that gradient canaries hold at once (chunks of canaries x parameters).
CANARY_CHUNK_ELEMENTS = 1 << 22


class TrainingMixin:
    """``forward_backward``, gradient canaries and ``optim_step``."""

    def forward_backward(
        self, data: Sequence[Datum], loss_fn: LossFnType, loss_fn_config: Mapping[str, float] | None = None
    ) -> ForwardBackwardOutput:
        self._check(data, loss_fn)
        if self._pending_reset:
            self._clear_gradients()
        if self._lora_per_sample is not None:
            self._lora_per_sample.begin(len(data))
        per_datum, logprobs, _, metrics = self._loss(data, loss_fn, loss_fn_config)
        if self._hooks is not None:
            # Opacus' per-sample hooks sit on LoRA layers whose inputs come from frozen layers; torch
            # warns that such a hook sees no input gradients, which per-sample gradients do not need.
            # Added to the process's filters (once; filterwarnings drops a duplicate), not in a
            # catch_warnings block: that swaps the process-wide list and puts back what it found, so
            # sessions backpropagating on other threads would lose or leak each other's filters.
            warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
        per_datum.sum().backward()
        if self._dp is not None:
            # Clip each datum's gradient and add it to the running sum, then drop the
            # per-sample gradients so the next micro-batch starts clean.
            if self._lora_per_sample is not None:
                self._dp.accumulate_clipped(self._lora_per_sample.clipped_sums(self._cfg.dp.max_grad_norm))
            else:
                for param in self._params:  # under autocast: clip, sum and noise in float32
                    sample = getattr(param, "grad_sample", None)
                    if sample is not None and sample.dtype != param.dtype:
                        param.grad_sample = sample.to(param.dtype)
                self._dp.clip_and_accumulate()
            for param in self._params:
                param.grad_sample = None
                param.grad = None
        return self._output(loss_fn, logprobs, data, metrics)

    def forward_backward_canaries(self, coordinates: Sequence[int], norm: float) -> None:
        """Accumulate Dirac canaries as per-sample gradients, clipped by Opacus like any datum's."""
        self._require()
        if self._dp is None:
            raise BackendError("gradient canaries need DP-SGD: this backend was initialised with dp.enabled false")
        if not (math.isfinite(norm) and norm > 0):
            raise BackendError(f"a canary's norm must be a positive finite number, got {norm}")
        sizes = [p.numel() for p in self._params]
        offsets = [0, *itertools.accumulate(sizes)]
        bad = [c for c in coordinates if not 0 <= c < offsets[-1]]
        if bad:
            raise BackendError(f"canary coordinate {bad[0]} is outside the {offsets[-1]} trainable parameters")
        if self._pending_reset:
            self._clear_gradients()
        # Per-sample gradients of a chunk of canaries at a time, to bound their memory.
        chunk = max(1, CANARY_CHUNK_ELEMENTS // offsets[-1])
        for start in range(0, len(coordinates), chunk):
            batch = coordinates[start : start + chunk]
            samples = [
                torch.zeros((len(batch), size), dtype=p.dtype, device=p.device)
                for p, size in zip(self._params, sizes, strict=True)
            ]
            for row, coordinate in enumerate(batch):
                index = bisect.bisect_right(offsets, coordinate) - 1
                samples[index][row, coordinate - offsets[index]] = norm
            for param, sample in zip(self._params, samples, strict=True):
                param.grad_sample = sample.view(len(batch), *param.shape)
            self._dp.clip_and_accumulate()
            for param in self._params:
                param.grad_sample = None

    _pending_reset = False

    def _clear_gradients(self) -> None:
        for param in self._params:
            param.grad = None
            if self._dp is not None:
                param.grad_sample = None
                param.summed_grad = None
        self._pending_reset = False

    def optim_step(self, adam_params: AdamParams) -> OptimStepResponse:
        cfg = self._cfg
        if self._pending_reset:
            self._clear_gradients()
        for group in self._optimizer.param_groups:
            group.update(
                lr=adam_params.learning_rate,
                betas=(adam_params.beta1, adam_params.beta2),
                eps=adam_params.eps,
                weight_decay=adam_params.weight_decay,
            )
        workers = self._workers
        if self._dp is not None:
            for param in self._params:
                if getattr(param, "summed_grad", None) is None:
                    param.summed_grad = torch.zeros_like(param)  # an empty Poisson batch: noise only
            if workers is None or workers.rank == 0:
                if workers is not None:  # the clipped sums of every worker's data, on this worker
                    workers.sum_to_leader([p.summed_grad for p in self._params])
                self._dp.add_step_noise(self._step)  # once, for all the workers
            else:
                workers.sum_to_leader([p.summed_grad for p in self._params])
                for param in self._params:
                    param.grad = torch.empty_like(param)
            if workers is not None:  # the leader's noised sum, on every worker
                workers.from_leader([p.grad for p in self._params])
            for param in self._params:
                param.grad /= cfg.training.batch_size  # the global expected batch size
                param.summed_grad = None  # the noised sum is in grad now; a session keeps one copy
            self._noised_gradient = torch.cat([p.grad.detach().reshape(-1) for p in self._params]).float().cpu()
        else:
            for param in self._params:
                if param.grad is None:
                    param.grad = torch.zeros_like(param)
            if workers is not None:
                workers.sum_everywhere([p.grad for p in self._params])
            if adam_params.grad_clip_norm > 0:
                torch.nn.utils.clip_grad_norm_(self._params, adam_params.grad_clip_norm)
        grad_norm = float(torch.sqrt(sum((p.grad.float() ** 2).sum() for p in self._params)))
        self._optimizer.step()
        self._step += 1
        # Gradients stay readable until the next forward_backward (tests and diagnostics use them).
        self._pending_reset = True
        return OptimStepResponse(step=self._step, metrics={"grad_norm": grad_norm})

    def noised_gradient(self) -> list[float]:
        self._require()
        if self._dp is None:
            raise BackendError("noised_gradient needs DP-SGD: this backend was initialised with dp.enabled false")
        if self._noised_gradient is None:
            raise BackendError("no DP optim_step has run yet (since initialisation or the last load_state)")
        return list(self._noised_gradient.tolist())

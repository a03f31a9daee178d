"""The torch backend's losses: batches as padded tensors, per-datum losses, and the forward pass.

``cross_entropy`` sums each datum's weighted token losses; ``importance_sampling``
and ``ppo`` are the policy losses over the sampler's logprobs and advantages
(Tinker's definitions). Under ``model.dtype`` bfloat16 or float16 the forward
pass runs under autocast, and the logprobs are taken in float32.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from tensafe.errors import BackendError
from tensafe.types import LOSS_INPUTS, Datum, ForwardBackwardOutput, LossFnType

PPO_CLIP = (0.8, 1.2)


class LossMixin:
    """Per-datum losses of a batch, and ``forward`` (no gradients)."""

    def _check(self, data: Sequence[Datum], loss_fn: str) -> None:
        self._require()
        if loss_fn not in LOSS_INPUTS:
            raise BackendError(f"unknown loss_fn {loss_fn!r}; known: {', '.join(sorted(LOSS_INPUTS))}")
        if not data:
            raise BackendError("empty batch: forward needs at least one datum")
        for index, datum in enumerate(data):
            missing = LOSS_INPUTS[loss_fn] - set(datum.loss_fn_inputs) - {"weights"}
            if missing:
                raise BackendError(f"datum {index}: loss {loss_fn!r} needs loss_fn_inputs {sorted(missing)}")
            tokens = [*datum.model_input, *datum.target_tokens]
            bad = [t for t in tokens if not 0 <= t < self._vocab_size]
            if bad:
                raise BackendError(
                    f"datum {index}: token id {bad[0]} is outside the vocabulary (0..{self._vocab_size - 1})"
                )
            if len(datum.model_input) > self._max_positions:
                raise BackendError(
                    f"datum {index}: {len(datum.model_input)} tokens exceed the model's {self._max_positions} positions"
                )

    def _tensors(self, data: Sequence[Datum]) -> dict[str, torch.Tensor]:
        width = max(len(d.model_input) for d in data)
        rows = len(data)

        def pad(values: list[list[float]], dtype: torch.dtype) -> torch.Tensor:
            out = torch.zeros((rows, width), dtype=dtype)
            for i, row in enumerate(values):
                out[i, : len(row)] = torch.tensor(row, dtype=dtype)
            return out.to(self._device)

        mask = [[1.0] * len(d.model_input) for d in data]
        return {
            "input_ids": pad([d.model_input for d in data], torch.long),  # type: ignore[misc]
            "attention_mask": pad(mask, torch.long),
            "mask": pad(mask, torch.float32),
            "targets": pad([d.target_tokens for d in data], torch.long),  # type: ignore[misc]
            "weights": pad([d.values("weights", 1.0) for d in data], torch.float32),
            "sampler_logprobs": pad([d.values("logprobs", 0.0) for d in data], torch.float32),
            "advantages": pad([d.values("advantages", 0.0) for d in data], torch.float32),
        }

    def _loss(
        self, data: Sequence[Datum], loss_fn: str, loss_fn_config: Mapping[str, float] | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, float]]:
        """Per-datum losses, target logprobs (rows, width) and the token mask."""
        t = self._tensors(data)
        with torch.autocast(
            self._device.type, dtype=self._autocast or torch.bfloat16, enabled=self._autocast is not None
        ):
            logits = self._forward_module(input_ids=t["input_ids"], attention_mask=t["attention_mask"]).logits
        logprobs = torch.log_softmax(logits.float(), dim=-1).gather(-1, t["targets"].unsqueeze(-1)).squeeze(-1)
        mask = t["mask"]
        metrics: dict[str, float] = {}
        if loss_fn == "cross_entropy":
            per_datum = -(t["weights"] * logprobs * mask).sum(dim=1)
        else:
            config = dict(loss_fn_config or {})
            # Weights scale each position's policy loss (0 on prompt tokens), once; the ratio metrics
            # describe the positions with weight.
            weights = mask * t["weights"]
            mask = (weights != 0).float()
            ratio = torch.exp(logprobs - t["sampler_logprobs"])
            advantages = t["advantages"]
            if loss_fn == "importance_sampling":
                per_datum = -(ratio * advantages * weights).sum(dim=1)
            else:
                low = float(config.get("clip_low_threshold", PPO_CLIP[0]))
                high = float(config.get("clip_high_threshold", PPO_CLIP[1]))
                if not 0 < low <= 1 <= high:
                    raise BackendError(f"ppo clip thresholds must satisfy 0 < low <= 1 <= high, got {low}, {high}")
                clipped = torch.clamp(ratio, low, high)
                objective = torch.minimum(ratio * advantages, clipped * advantages)
                per_datum = -(objective * weights).sum(dim=1)
                outside = ((ratio < low) | (ratio > high)).float() * mask
                metrics["clip_fraction"] = float(outside.sum() / mask.sum().clamp(min=1))
            with torch.no_grad():
                tokens = mask.sum().clamp(min=1)
                log_ratio = (logprobs - t["sampler_logprobs"]) * mask
                metrics["ratio_mean"] = float((ratio * mask).sum() / tokens)
                metrics["kl_sampler"] = float(((torch.exp(log_ratio) - 1 - log_ratio) * mask).sum() / tokens)
        metrics["loss:sum"] = float(per_datum.detach().sum())
        return per_datum, logprobs, mask, metrics

    def _output(
        self, loss_fn: str, logprobs: torch.Tensor, data: Sequence[Datum], metrics: dict[str, float]
    ) -> ForwardBackwardOutput:
        rows = logprobs.detach().cpu()
        outputs = [{"logprobs": rows[i, : len(d.model_input)].tolist()} for i, d in enumerate(data)]
        return ForwardBackwardOutput(loss_fn_output_type=loss_fn, loss_fn_outputs=outputs, metrics=metrics)

    def forward(
        self, data: Sequence[Datum], loss_fn: LossFnType, loss_fn_config: Mapping[str, float] | None = None
    ) -> ForwardBackwardOutput:
        self._check(data, loss_fn)
        self._peft.eval()
        try:
            with torch.no_grad():
                if self._hooks is not None:
                    # GradSampleModule's hooks are only needed for training.
                    self._hooks.disable_hooks()
                try:
                    _, logprobs, _, metrics = self._loss(data, loss_fn, loss_fn_config)
                finally:
                    if self._hooks is not None:
                        self._hooks.enable_hooks()
        finally:
            self._peft.train()
        return self._output(loss_fn, logprobs, data, metrics)

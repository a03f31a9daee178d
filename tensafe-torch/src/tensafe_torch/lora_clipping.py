"""Per-sample gradients of LoRA adapters, computed in the backward pass itself (``dp.clipping: lora``).

DP-SGD needs each datum's gradient before it is clipped. Opacus'
``GradSampleModule`` obtains them with a forward hook and a full backward hook
on every trainable layer, and autograd still computes the summed weight
gradient besides. A LoRA adapter is two bias-free linear maps, ``A`` (r x d_in)
and ``B`` (d_out x r); for a linear map ``y = W x`` applied to the tokens
``x_t`` of one datum, with output gradients ``g_t``, that datum's gradient is
``dW = sum_t g_t x_t^T``: one batched matrix product over the datum's tokens,
of the same cost as the summed gradient autograd would have formed. Since
``A`` and ``B`` are small, these per-sample gradients are materialised: for a
sequence longer than r that is cheaper, in time and memory, than ghost norms
from the Gram matrices of the token sequences, and it takes one pass over them
to find the norms and one matrix-vector product to form the clipped sum.

:class:`LoraPerSampleGradients` replaces the forward of each adapter's linear
maps with an autograd function whose backward records the per-sample gradient
of the weight and returns no summed gradient. Each is computed with the
adapter's rank r as its row count (``A``'s gradient as is, ``B``'s
transposed), the batched product CPUs do fastest at these shapes. Then
:meth:`LoraPerSampleGradients.clipped_sums` scales datum i's gradient by
``min(1, C / (||g_i|| + 1e-6))``, the rule of Opacus' ``clip_and_accumulate``
that the hook path uses, and sums over the data. Padding positions receive
zero output gradient (their loss weight is zero and, with a causal mask, no
real position attends to them), so they add nothing to any datum's gradient.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.nn import functional

from tensafe.errors import BackendError

VANILLA = "lora"


def _lora_linears(model: torch.nn.Module) -> dict[torch.nn.Parameter, torch.nn.Linear]:
    """The weight of every plain LoRA ``A`` and ``B`` linear map in ``model``, with its module."""
    from peft.tuners.lora import LoraLayer

    found: dict[torch.nn.Parameter, torch.nn.Linear] = {}
    for layer in model.modules():
        if not isinstance(layer, LoraLayer):
            continue
        for adapter, a in layer.lora_A.items():
            if adapter in layer.lora_variant:  # DoRA and other variants compute more than B(A x)
                continue
            for linear in (a, layer.lora_B[adapter]):
                if type(linear) is torch.nn.Linear and linear.bias is None:
                    found[linear.weight] = linear
    return found


def unsupported_parameters(model: torch.nn.Module, names: Sequence[str], params: Sequence[torch.Tensor]) -> list[str]:
    """The trainable parameters that are not the weight of a plain LoRA linear map (empty: the fast path applies)."""
    supported = _lora_linears(model)
    return [name for name, param in zip(names, params, strict=True) if param not in supported]


class _PerSampleLinear(torch.autograd.Function):
    """``x W^T`` whose backward records each datum's weight gradient instead of their sum."""

    @staticmethod
    def forward(x: torch.Tensor, weight: torch.Tensor, recorder: LoraPerSampleGradients, index: int) -> torch.Tensor:
        return functional.linear(x, weight)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        x, weight, recorder, index = inputs
        ctx.save_for_backward(x, weight)
        ctx.recorder, ctx.index = recorder, index

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None]:
        x, weight = ctx.saved_tensors
        rows = x.shape[0]
        # Per-sample gradients in float32 even under autocast: their norms decide the clipping.
        outputs = grad.reshape(rows, -1, grad.shape[-1]).float()
        inputs = x.reshape(rows, -1, x.shape[-1]).float()
        # (rows, r, d): the rank as row count, whichever side of the weight it is on.
        transposed = outputs.shape[-1] > inputs.shape[-1]
        if transposed:
            per_sample = torch.bmm(inputs.transpose(1, 2), outputs)
        else:
            per_sample = torch.bmm(outputs.transpose(1, 2), inputs)
        ctx.recorder.record(ctx.index, per_sample, transposed)
        grad_x = grad @ weight.to(grad.dtype) if ctx.needs_input_grad[0] else None
        return grad_x, None, None, None


class LoraPerSampleGradients:
    """Per-sample gradients of a PEFT model's LoRA weights, found by each backward pass, and their clipped sum.

    Active only while gradients are enabled: forwards under ``torch.no_grad``
    (evaluation, sampling) run the plain linear maps.
    """

    def __init__(self, model: torch.nn.Module, names: Sequence[str], params: Sequence[torch.nn.Parameter]) -> None:
        unsupported = unsupported_parameters(model, names, params)
        if unsupported:
            raise BackendError(
                "dp.clipping 'lora' needs every trainable parameter to be a plain LoRA A or B weight; "
                f"these are not: {unsupported[:5]}{' ...' if len(unsupported) > 5 else ''}; "
                "use dp.clipping 'hooks' (or 'auto')"
            )
        self._params = list(params)
        self._rows = 0
        self._samples: list[torch.Tensor | None] = [None] * len(self._params)
        self._transposed = [False] * len(self._params)
        modules = _lora_linears(model)
        for index, param in enumerate(self._params):
            self._route(modules[param], index)

    def _route(self, linear: torch.nn.Linear, index: int) -> None:
        recorder = self

        def forward(x: torch.Tensor) -> torch.Tensor:
            if not (torch.is_grad_enabled() and linear.weight.requires_grad):
                return functional.linear(x, linear.weight)
            return _PerSampleLinear.apply(x, linear.weight, recorder, index)  # type: ignore[no-untyped-call,no-any-return]

        linear.forward = forward  # type: ignore[method-assign,assignment]

    def begin(self, rows: int) -> None:
        """Expect a backward pass over ``rows`` data; drops what an earlier pass left."""
        self._rows = rows
        self._samples = [None] * len(self._params)

    def record(self, index: int, per_sample: torch.Tensor, transposed: bool) -> None:
        if per_sample.shape[0] != self._rows:
            raise BackendError(
                f"a LoRA layer saw {per_sample.shape[0]} rows in a batch of {self._rows} data; "
                "dp.clipping 'lora' needs the batch as the first dimension of every adapter's input"
            )
        earlier = self._samples[index]
        # An adapter applied twice in one forward: its per-sample gradients add up.
        self._samples[index] = per_sample if earlier is None else earlier + per_sample
        self._transposed[index] = transposed

    def clipped_sums(self, max_grad_norm: float) -> list[torch.Tensor]:
        """Per parameter, the sum over the data of each datum's gradient clipped to ``max_grad_norm``.

        A parameter no token reached has zero gradient for every datum. The
        per-sample gradients are dropped.
        """
        samples, self._samples = self._samples, [None] * len(self._params)
        flat = [s.reshape(self._rows, -1) for s in samples if s is not None]
        if not flat:
            return [torch.zeros_like(p) for p in self._params]
        norms = torch.stack([torch.linalg.vector_norm(f, dim=1) for f in flat], dim=1)
        factors = (max_grad_norm / (torch.linalg.vector_norm(norms, dim=1) + 1e-6)).clamp(max=1.0)
        sums: list[torch.Tensor] = []
        for param, sample, transposed in zip(self._params, samples, self._transposed, strict=True):
            if sample is None:
                sums.append(torch.zeros_like(param))
                continue
            summed = (factors.to(sample.dtype) @ sample.reshape(self._rows, -1)).view(sample.shape[1:])
            sums.append((summed.t() if transposed else summed).to(param.dtype).contiguous())
        return sums

"""The torch backend's sampling: batched generation with a KV cache, stop rules and seeded generators."""

from __future__ import annotations

import inspect
import math
import secrets
from collections.abc import Iterator, Sequence

import torch

from tensafe.errors import BackendError
from tensafe.types import SampledSequence, SampleResponse, SamplingParams, StopReason

DEFAULT_MAX_TOKENS = 64


def seeded_generator(seed: int | None, device: torch.device) -> torch.Generator:
    """A generator seeded with ``seed``, or from the CSPRNG when it is None (sampling, not DP noise)."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed if seed is not None else secrets.randbits(63))
    return generator


class GenerationMixin:
    """``sample`` and ``sample_stream``."""

    def _generate(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams, count: int, generator: torch.Generator
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (tokens, logprobs), each of shape (prompts * count,), one position at a time.

        The prompts must have one length, so they run as one batch without padding.
        """
        ids = torch.tensor([list(p) for p in prompts for _ in range(count)], dtype=torch.long, device=self._device)
        prompt = prompts[0]
        model = self._peft
        # transformers 5 renamed the KV cache argument and output from past_key_values to cache.
        cache_name = (
            "cache" if "cache" in inspect.signature(model.get_base_model().forward).parameters else ("past_key_values")
        )
        cache = None
        step_input = ids
        for _ in range(self._max_new_tokens(prompt, params)):
            out = model(input_ids=step_input, use_cache=True, **{cache_name: cache})
            cache = out[cache_name]
            logits = out.logits[:, -1, :].float()
            if params.temperature == 0:
                token = logits.argmax(dim=-1)
                logprob = torch.log_softmax(logits, dim=-1).gather(-1, token[:, None]).squeeze(-1)
            else:
                logits = logits / params.temperature
                if params.top_k > 0 and params.top_k < logits.shape[-1]:
                    kth = torch.topk(logits, params.top_k, dim=-1).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, -math.inf)
                probs = torch.softmax(logits, dim=-1)
                if params.top_p < 1.0:
                    sorted_probs, order = torch.sort(probs, descending=True, dim=-1)
                    before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
                    sorted_probs = sorted_probs.masked_fill(before >= params.top_p, 0.0)
                    probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
                    probs = probs / probs.sum(dim=-1, keepdim=True)
                token = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
                logprob = torch.log(probs.gather(-1, token[:, None]).squeeze(-1))
            yield token, logprob
            step_input = token[:, None]

    def _max_new_tokens(self, prompt: Sequence[int], params: SamplingParams) -> int:
        room = self._max_positions - len(prompt)
        if room < 1:
            raise BackendError(f"prompt of {len(prompt)} tokens leaves no room in {self._max_positions} positions")
        return min(params.max_tokens or DEFAULT_MAX_TOKENS, room)

    def _stops(self, params: SamplingParams) -> tuple[set[int], list[str]]:
        ids = {int(self._tokenizer.eos_token_id)} if self._tokenizer.eos_token_id is not None else set()
        texts: list[str] = []
        stop = params.stop
        if isinstance(stop, str):
            texts.append(stop)
        elif stop:
            for item in stop:
                (texts.append(item) if isinstance(item, str) else ids.add(int(item)))  # type: ignore[func-returns-value]
        return ids, [t for t in texts if t]

    def _generator_for(self, params: SamplingParams) -> torch.Generator:
        """A fresh generator for a seeded request; otherwise the backend's own (saved with its state)."""
        return seeded_generator(params.seed, self._device) if params.seed is not None else self._sampling_generator

    def _check_prompt(self, prompt: Sequence[int]) -> None:
        if not prompt:
            raise BackendError("empty prompt: sampling needs at least one prompt token")
        bad = [t for t in prompt if not 0 <= t < self._vocab_size]
        if bad:
            raise BackendError(f"prompt token id {bad[0]} is outside the vocabulary (0..{self._vocab_size - 1})")

    def sample(
        self, prompts: Sequence[Sequence[int]], sampling_params: SamplingParams, num_samples: int = 1
    ) -> list[SampleResponse]:
        self._require()
        if num_samples < 1:
            raise BackendError("num_samples must be at least 1")
        for prompt in prompts:
            self._check_prompt(prompt)
        stop_ids, stop_texts = self._stops(sampling_params)
        generator = self._generator_for(sampling_params)
        responses: list[SampleResponse] = []
        self._peft.eval()
        try:
            with torch.no_grad():
                # Prompts of one length are generated together: one forward pass per position for all of them.
                by_length: dict[int, list[int]] = {}
                for index, prompt in enumerate(prompts):
                    by_length.setdefault(len(prompt), []).append(index)
                results: dict[int, SampleResponse] = {}
                for indices in by_length.values():
                    rows = len(indices) * num_samples
                    tokens: list[list[int]] = [[] for _ in range(rows)]
                    logprobs: list[list[float]] = [[] for _ in range(rows)]
                    reasons: list[StopReason | None] = [None] * rows
                    group = [prompts[i] for i in indices]
                    for token, logprob in self._generate(group, sampling_params, num_samples, generator):
                        for i in range(rows):
                            if reasons[i] is not None:
                                continue
                            tokens[i].append(int(token[i]))
                            logprobs[i].append(float(logprob[i]))
                            if tokens[i][-1] in stop_ids or (
                                stop_texts and any(s in self.decode(tokens[i]) for s in stop_texts)
                            ):
                                reasons[i] = "stop"
                        if all(r is not None for r in reasons):
                            break
                    for n, index in enumerate(indices):
                        results[index] = SampleResponse(
                            sequences=[
                                SampledSequence(
                                    tokens=tokens[i],
                                    logprobs=logprobs[i],
                                    stop_reason=reasons[i] or "length",
                                    text=self.decode(tokens[i]),
                                )
                                for i in range(n * num_samples, (n + 1) * num_samples)
                            ]
                        )
                responses = [results[i] for i in range(len(prompts))]
        finally:
            self._peft.train()
        return responses

    def sample_stream(self, prompt: Sequence[int], sampling_params: SamplingParams) -> Iterator[str]:
        """Yield the text of one continuation piece by piece, as it is generated."""
        self._require()
        self._check_prompt(prompt)
        stop_ids, stop_texts = self._stops(sampling_params)
        generator = self._generator_for(sampling_params)
        tokens: list[int] = []
        shown = ""
        self._peft.eval()
        try:
            with torch.no_grad():
                for token, _ in self._generate([prompt], sampling_params, 1, generator):
                    tokens.append(int(token[0]))
                    text = self.decode(tokens)
                    if text.startswith(shown) and len(text) > len(shown):
                        yield text[len(shown) :]
                        shown = text
                    if tokens[-1] in stop_ids or (stop_texts and any(s in text for s in stop_texts)):
                        break
        finally:
            self._peft.train()

"""`tensafe inference`: generate with a base model and an optional adapter."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import click

from tensafe.cli.commands import CONFIG_ARG, emit_json, load_with_overrides
from tensafe.cli.context import plugin_manager
from tensafe.errors import UsageError

if TYPE_CHECKING:
    from tensafe.config import RunConfig
    from tensafe.types import SampleResponse


@click.command("inference")
@CONFIG_ARG
@click.option("-p", "--prompt", "prompts", multiple=True, required=True, help="Prompt text (repeatable).")
@click.option(
    "--adapter", type=click.Path(path_type=Path), help="A run's adapter directory, or a signed .tgsp package."
)
@click.option("--recipient-key", type=click.Path(path_type=Path), help="Your private recipient key (.tgsp only).")
@click.option(
    "--trusted",
    "trusted",
    multiple=True,
    type=click.Path(path_type=Path),
    help="Public key of a signer you trust (.tgsp only; repeatable).",
)
@click.option(
    "--insecure-allow-untrusted-signer",
    "allow_untrusted",
    is_flag=True,
    help="Open a .tgsp package signed by a key you do NOT trust. Anyone could have made it.",
)
@click.option("--model", help="Base model: a local directory or hub id (overrides model.path).")
@click.option("--max-tokens", type=int, help="Most tokens to generate.")
@click.option("--temperature", type=float, help="0 = greedy.")
@click.option("--top-p", type=float, help="Nucleus sampling mass.")
@click.option("--top-k", type=int, help="Keep the k most likely tokens (-1 = all).")
@click.option("--seed", type=int, help="Seed for reproducible sampling.")
@click.option("--stop", multiple=True, help="Stop string (repeatable).")
@click.option(
    "-n", "--num-samples", default=1, show_default=True, type=click.IntRange(1, 64), help="Samples per prompt."
)
@click.option("--json", "as_json", is_flag=True, help="Print tokens, logprobs and stop reasons as JSON.")
@click.option(
    "--he",
    "he",
    is_flag=True,
    help="Compute the adapter's LoRA products under homomorphic encryption (HE-LoRA; needs an HE backend "
    "such as tensafe-he-seal's 'seal-ckks', configured by the he section).",
)
@click.option(
    "--server",
    metavar="URL",
    help="With --he: a TenSafe server evaluates, this process holds the key and answers each turn (the "
    "secret key and the plaintext adapter never leave it). --model then names one of the server's models.",
)
@click.option("--api-key", envvar="TENSAFE_API_KEY", help="The server's API key (default: $TENSAFE_API_KEY).")
@click.option(
    "--key-owner-state",
    type=click.Path(path_type=Path),
    help="With --server and an HE-encrypted .tgsp: the key owner state `tensafe he pack` wrote "
    "(default: he.key_owner_state; passphrase from $TENSAFE_HE_PASSPHRASE).",
)
@click.pass_context
def inference_cmd(
    ctx: click.Context,
    config_file: Path | None,
    prompts: tuple[str, ...],
    adapter: Path | None,
    max_tokens: int | None,
    temperature: float | None,
    top_p: float | None,
    top_k: int | None,
    seed: int | None,
    stop: tuple[str, ...],
    num_samples: int,
    as_json: bool,
    recipient_key: Path | None,
    trusted: tuple[Path, ...],
    allow_untrusted: bool,
    he: bool,
    model: str | None,
    server: str | None,
    api_key: str | None,
    key_owner_state: Path | None,
) -> None:
    """Generate text from a base model, with or without a trained adapter.

    The model and backend come from CONFIG (default: the embedded model).
    """
    from tensafe.orchestrator import TenSafeOrchestrator

    if server is not None or key_owner_state is not None:
        _check_remote(server, api_key, he, adapter)
        assert server is not None and api_key is not None and adapter is not None
        overrides = {
            "sampling.max_tokens": max_tokens,
            "sampling.temperature": temperature,
            "sampling.top_p": top_p,
            "sampling.top_k": top_k,
            "sampling.seed": seed,
            "sampling.stop": list(stop) or None,
        }
        config = load_with_overrides(config_file, **overrides)
        remote = _Remote(server, api_key, model, adapter, key_owner_state)
        responses = remote.generate(ctx, config, list(prompts), num_samples)
        _print(prompts, responses, as_json)
        return
    config = load_with_overrides(
        config_file,
        **{
            "sampling.max_tokens": max_tokens,
            "sampling.temperature": temperature,
            "sampling.top_p": top_p,
            "sampling.top_k": top_k,
            "sampling.seed": seed,
            "sampling.stop": list(stop) or None,
            "tgsp.recipient_key": recipient_key,
            "tgsp.trusted_signers": list(trusted) or None,
            "model.path": model,
        },
    )
    orchestrator = TenSafeOrchestrator(config, plugin_manager=plugin_manager(ctx))
    if allow_untrusted:
        click.echo(
            "WARNING: --insecure-allow-untrusted-signer: the package's signer is NOT verified as "
            "anyone you trust; its contents could come from anyone.",
            err=True,
        )
        orchestrator.allow_untrusted_signer = True
    if not as_json and num_samples == 1:
        for prompt in prompts:
            pieces = orchestrator.stream(prompt, adapter=adapter, he=he)
            click.echo(prompt, nl=False)
            for piece in pieces:
                click.echo(piece, nl=False)
            click.echo()
        return
    responses = orchestrator.generate(list(prompts), adapter=adapter, num_samples=num_samples, he=he)
    _print(prompts, responses, as_json)


def _print(prompts: tuple[str, ...], responses: list[SampleResponse], as_json: bool) -> None:
    if as_json:
        emit_json([r.model_dump() for r in responses])
        return
    for prompt, response in zip(prompts, responses, strict=True):
        for seq in response.sequences:
            click.echo(f"{prompt}{seq.text}")
            click.echo(f"  [{len(seq.tokens)} tokens, stop: {seq.stop_reason}]", err=True)


def _check_remote(server: str | None, api_key: str | None, he: bool, adapter: Path | None) -> None:
    """One clear line for each piece a key owner run against a server lacks."""
    if server is None:
        raise UsageError("--key-owner-state is for HE inference against a server: add --he --server URL")
    if not he:
        raise UsageError(
            "--server runs HE inference with a TenSafe server as the evaluator: add --he "
            "(plaintext generation with an adapter runs locally, or through the SDK's inference sessions)"
        )
    if not api_key:
        raise UsageError("--he --server needs the server's API key: --api-key KEY or $TENSAFE_API_KEY")
    if adapter is None:
        raise UsageError("--he --server needs --adapter: a PEFT directory or an HE-encrypted .tgsp package")


@dataclass
class _Remote:
    """This process as the key owner, a TenSafe server as the evaluator."""

    server: str
    api_key: str
    model: str | None
    adapter: Path
    key_owner_state: Path | None

    def generate(
        self, ctx: click.Context, config: RunConfig, prompts: list[str], num_samples: int
    ) -> list[SampleResponse]:
        from tensafe.sdk.client import TenSafeClient

        with TenSafeClient(self.server, self.api_key) as client:
            session = client.create_he_inference_session(
                config,
                model=self.model,
                adapter=self.adapter,
                key_owner_state=self.key_owner_state,
                plugin_manager=plugin_manager(ctx),
            )
            return session.generate(prompts, config.sampling, num_samples)

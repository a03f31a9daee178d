"""`tensafe inference`: generate with a base model and an optional adapter."""

from __future__ import annotations

from pathlib import Path

import click

from tensafe.cli.commands import CONFIG_ARG, emit_json, load_with_overrides
from tensafe.cli.context import plugin_manager


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
) -> None:
    """Generate text from a base model, with or without a trained adapter.

    The model and backend come from CONFIG (default: the embedded model).
    """
    from tensafe.orchestrator import TenSafeOrchestrator

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
    if as_json:
        emit_json([r.model_dump() for r in responses])
        return
    for prompt, response in zip(prompts, responses, strict=True):
        for seq in response.sequences:
            click.echo(f"{prompt}{seq.text}")
            click.echo(f"  [{len(seq.tokens)} tokens, stop: {seq.stop_reason}]", err=True)

"""Configuration: one pydantic model per concept, composed into :class:`RunConfig`.

Every model forbids unknown fields, so a typo is an error naming the field.
Configs load from YAML, TOML or JSON (:func:`load_config`), and any field can be
overridden from the environment: ``TENSAFE_CONFIG__DP__NOISE_MULTIPLIER=1.2``
sets ``dp.noise_multiplier`` (values are parsed as JSON when they parse, else
taken as strings).
"""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tensafe.errors import ConfigError
from tensafe.types import INT64_MAX, MAX_TOKEN_ID, MIN_TEMPERATURE, AdamParams, SamplingParams

ENV_PREFIX = "TENSAFE_CONFIG__"
#: Most of anything counted (steps, records, batch sizes, prompts): far beyond any run, and a 32-bit count.
MAX_COUNT = 2**31 - 1


class _Section(BaseModel):
    # NaN and infinity are refused everywhere: an infinite step size or clipping norm trains the model to NaN.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class ModelConfig(_Section):
    """Which base model to load, and how."""

    path: str | None = Field(
        None,
        description="Local directory or hub id of a causal LM; None = the ML backend's embedded default model.",
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="Weights' dtype.")
    device: str = Field(
        "auto",
        pattern=r"^(auto|cpu|mps|cuda(:[0-9]{1,3})?)$",
        description="'auto' (a CUDA GPU when there is one, else the CPU), 'cpu', 'cuda', 'cuda:N' or 'mps'.",
    )
    max_seq_len: int = Field(
        256, ge=2, le=MAX_TOKEN_ID, description="Longest training sequence in tokens; longer ones are cut."
    )


class LoraConfig(_Section):
    """The LoRA adapter that is trained; only its parameters change."""

    rank: int = Field(8, ge=1, le=1024, description="Adapter rank r.")
    alpha: float | None = Field(None, gt=0, le=1e6, description="Scaling numerator; None = 2 * rank.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapter input.")
    target_modules: list[str] | None = Field(
        None, description="Module names to adapt; None = chosen from train_attn / train_mlp / train_unembed."
    )
    train_attn: bool = Field(True, description="Adapt attention projections.")
    train_mlp: bool = Field(True, description="Adapt MLP projections.")
    train_unembed: bool = Field(False, description="Adapt the output projection (lm_head).")
    seed: int | None = Field(
        None, ge=0, le=INT64_MAX, description="Seed for the adapter's initialisation, 0 to 2**63 - 1."
    )

    @property
    def scaling_alpha(self) -> float:
        return self.alpha if self.alpha is not None else 2.0 * self.rank


class DPConfig(_Section):
    """Differential privacy for training (DP-SGD)."""

    enabled: bool = Field(True, description="Train with DP-SGD. Turning this off voids every privacy claim.")
    target_epsilon: float | None = Field(
        8.0,
        gt=0,
        le=1e6,
        description="Privacy budget; no step may take the run past it. None = no budget (needs a noise multiplier).",
    )
    target_delta: float | None = Field(
        None, gt=0, lt=1, description="delta of (epsilon, delta)-DP; None = 1 / (10 * dataset size)."
    )
    noise_multiplier: float | None = Field(
        None,
        gt=0,
        le=1e6,
        description="Noise std / clipping norm; None = calibrated to reach target_epsilon at the planned steps.",
    )
    max_grad_norm: float = Field(1.0, gt=0, le=1e6, description="Per-sample gradient clipping norm C, finite.")
    accountant: str = Field("rdp", description="Registered privacy accountant: 'rdp' or 'pld' (tensafe-privacy).")
    warn_fraction: float = Field(
        0.8, gt=0, le=1, description="Report a warning once this share of the budget is spent."
    )
    secure_rng: bool = Field(
        True,
        description="Seed the noise from the OS CSPRNG, afresh on every start and resume, and never persist it; "
        "False seeds it from training.seed (reproducible, not private).",
    )
    secure_mode: bool = Field(
        False,
        description="Opacus secure mode: each noise value sums four Gaussian samples, which resists "
        "floating-point attacks on the noise; with secure_rng every sample comes from the OS CSPRNG. "
        "Slower (see benchmarks/dp_overhead.py).",
    )
    clipping: Literal["auto", "hooks", "lora"] = Field(
        "auto",
        description="How the torch backend finds each datum's gradient before clipping it to max_grad_norm. 'hooks': "
        "Opacus' per-sample hooks, for any trainable layer. 'lora': each LoRA A and B weight's per-sample "
        "gradient is formed in the backward pass itself (sum over the datum's tokens of output gradient times "
        "input), with no hooks and no summed gradient besides; needs every trainable parameter to be a plain "
        "LoRA weight. 'auto': 'lora' where it applies, else 'hooks'. Both clip the same gradients; the update "
        "and the privacy guarantee do not depend on the choice, only the speed does.",
    )

    @model_validator(mode="after")
    def _budget_or_noise(self) -> DPConfig:
        if self.enabled and self.target_epsilon is None and self.noise_multiplier is None:
            raise ValueError("set target_epsilon, noise_multiplier, or both")
        return self


class TrainingConfig(_Section):
    """How long and on what batches to train."""

    steps: int = Field(300, ge=1, le=MAX_COUNT, description="Optimizer steps to take.")
    batch_size: int = Field(
        64,
        ge=1,
        le=MAX_COUNT,
        description="Expected logical batch size (Poisson sampling rate = batch_size / records).",
    )
    micro_batch_size: int = Field(
        64,
        ge=1,
        le=MAX_COUNT,
        description="Physical batch size; bounds memory at large logical batches (results do not change).",
    )
    eval_every: int = Field(
        0, ge=0, le=MAX_COUNT, description="Report held-out loss every N steps (0 = only before and after)."
    )
    checkpoint_every: int = Field(
        25, ge=0, le=MAX_COUNT, description="Write a resumable checkpoint every N steps (0 = only at the end)."
    )
    seed: int | None = Field(
        0,
        ge=0,
        le=INT64_MAX,
        description="Seed for sampling of batches and generation, 0 to 2**63 - 1; None = fresh randomness.",
    )
    worker_timeout_s: float = Field(
        300.0,
        gt=0,
        le=86400,
        description="With several workers (tensafe run --nproc-per-node, torchrun): how long a worker waits for the "
        "others at a collective before the run stops (a worker that died or hangs stops the run).",
    )


class DataConfig(_Section):
    """The training data: JSONL records of {prompt, completion} or {text}."""

    path: Path | None = Field(None, description="JSONL file; None = the ML backend's embedded default dataset.")
    eval_fraction: float = Field(0.1, ge=0, lt=1, description="Share of records held out for evaluation.")
    max_records: int | None = Field(None, ge=1, le=MAX_COUNT, description="Use at most this many records.")
    eval_path: Path | None = Field(
        None,
        description="JSONL file of held-out records; None = hold out eval_fraction of data.path, decided per "
        "record by a hash of its content (adding or removing a record moves no other).",
    )
    probes: list[str] | None = Field(
        None,
        description="Public prompts (not records) for sample completions before and after training and for the "
        "adapter-change check; None = the ML backend's public probes for its embedded dataset, if any.",
    )
    public: bool = Field(
        False,
        description="Declare the training data public: record text may then be shown (e.g. held-out prompts as "
        "samples). Leave False for private data.",
    )


class RewardTerm(_Section):
    """One reward function, by registered name or dotted path, with its weight and options."""

    name: str = Field(
        description="A registered reward ('exact_match', 'numeric', 'regex', ...) or 'package.module:attribute'."
    )
    weight: float = Field(
        1.0, ge=-1e6, le=1e6, description="Weight of this term in the weighted sum of all terms (finite)."
    )
    options: dict[str, Any] = Field(
        default_factory=dict, description="Keyword arguments for the reward's factory (e.g. tolerance, pattern)."
    )


class RLConfig(_Section):
    """Reinforcement learning with verifiable rewards (``mode: rlvr``).

    Each sampled prompt (a record: the privacy unit) yields ``group_size``
    rollouts, scored against the record's completion by the reward terms.
    ``training.steps`` counts optimizer steps; each Poisson-sampled batch is
    used for ``epochs`` of them.
    """

    algorithm: Literal["reinforce", "ppo"] = Field(
        "reinforce", description="'reinforce' (importance_sampling loss, one update) or 'ppo' (clipped ratio)."
    )
    rewards: list[RewardTerm] = Field(
        default_factory=lambda: [RewardTerm(name="exact_match")],
        min_length=1,
        description="Reward terms; several are combined as a weighted sum.",
    )
    group_size: int = Field(8, ge=1, le=256, description="Rollouts per prompt (G).")
    baseline: Literal["group", "running", "none"] = Field(
        "group",
        description="'group': mean reward of the prompt's rollouts (GRPO); 'running': moving average over batches "
        "(not with DP: it mixes records); 'none'.",
    )
    normalize_advantages: bool = Field(False, description="Divide group advantages by the group's reward std.")
    running_decay: float = Field(0.9, ge=0, lt=1, description="Decay of the running baseline.")
    epochs: int = Field(1, ge=1, le=16, description="Optimizer steps per sampled batch (PPO epochs).")
    clip_low: float = Field(0.8, gt=0, le=1, description="PPO: lower bound of the probability ratio.")
    clip_high: float = Field(
        1.2, ge=1, le=1e6, description="PPO: upper bound of the probability ratio (a large value turns clipping off)."
    )
    max_tokens: int = Field(16, ge=1, le=MAX_TOKEN_ID, description="Longest rollout in tokens.")
    temperature: float = Field(
        1.0,
        ge=MIN_TEMPERATURE,
        le=100,
        description=f"Rollout sampling temperature, {MIN_TEMPERATURE} to 100 as for sampling "
        "(1 keeps updates on-policy).",
    )
    stop: list[str] = Field(default_factory=list, description="Stop strings that end a rollout.")
    eval_prompts: int = Field(
        32, ge=0, le=MAX_COUNT, description="Held-out prompts scored (greedy) for the reward curve."
    )

    @model_validator(mode="after")
    def _consistent(self) -> RLConfig:
        if self.algorithm == "reinforce" and self.epochs != 1:
            raise ValueError("epochs > 1 needs algorithm: ppo (reinforce is on-policy, one update per batch)")
        if self.baseline == "group" and self.group_size < 2:
            raise ValueError("baseline 'group' needs group_size >= 2 (one rollout is its own baseline)")
        return self


class HEConfig(_Section):
    """Homomorphic encryption of the adapter's arithmetic at inference (CKKS).

    The default preset is N=8192 with three 60-bit primes (180 bits, within the
    218 bits the Homomorphic Encryption Standard allows for 128-bit security at
    that N): two data primes for HE-LoRA's one plaintext product, and the special
    prime. Backends reject parameters above the bound.
    """

    backend: str = Field("seal-ckks", description="Registered HE backend (tensafe-he-seal provides 'seal-ckks').")
    poly_modulus_degree: int = Field(8192, description="Ring dimension N (4096, 8192, 16384 or 32768).")
    coeff_mod_bit_sizes: list[int] = Field(
        [60, 60, 60], description="Coefficient modulus primes, in bits; the last is the key-switching prime."
    )
    scale_bits: int = Field(40, ge=20, le=60, description="log2 of the default CKKS scale.")
    key_owner_state: Path | None = Field(
        None,
        description="The adapter owner's HE-LoRA state (secret key and B matrices, sealed with scrypt and "
        "AES-256-GCM; `tensafe he pack` writes it), opened with the passphrase in $TENSAFE_HE_PASSPHRASE, to "
        "open an HE-encrypted .tgsp adapter in process; None = encrypt a plaintext adapter with fresh keys.",
    )
    mask_workers: int = Field(
        0,
        ge=0,
        le=64,
        description="HE inference in process: worker processes that encrypt the evaluator's masks ahead of time, "
        "off the token's critical path (0 = made inline); give them cores of their own. "
        "`tensafe serve --he-mask-workers` sets the same for served sessions.",
    )


class TGSPConfig(_Section):
    """Signed, encrypted adapter packages (tensafe-tgsp): written by runs, opened for inference."""

    loader: str = Field("tgsp", description="Registered TGSP loader (tensafe-tgsp provides 'tgsp').")
    signing_key: Path | None = Field(None, description="Producer's private signing key; set it to package runs.")
    recipients: list[Path] = Field(default_factory=list, description="Public keys of those who may open the package.")
    output: Path | None = Field(None, description="Package path; None = adapter.tgsp in the run directory.")
    recipient_key: Path | None = Field(None, description="Your private recipient key, to open packages.")
    trusted_signers: list[Path] = Field(default_factory=list, description="Signers whose packages may be opened.")


class RunConfig(_Section):
    """A whole run: what `tensafe run` and `tensafe train` execute."""

    mode: Literal["sft", "rlvr"] = Field(
        "sft", description="'sft': supervised fine-tuning; 'rlvr': reinforcement learning with verifiable rewards."
    )
    backend: str = Field("torch", description="Registered ML backend (tensafe-torch provides 'torch').")
    run_name: str | None = Field(None, description="Name of the run directory; None = a timestamped name.")
    output_dir: Path = Field(Path("tensafe-runs"), description="Where run directories are created.")
    model: ModelConfig = Field(default_factory=ModelConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    dp: DPConfig = Field(default_factory=DPConfig)
    optimizer: AdamParams = Field(default_factory=lambda: AdamParams(learning_rate=5e-3))
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    sampling: SamplingParams = Field(default_factory=lambda: SamplingParams(max_tokens=48, temperature=0.0))
    he: HEConfig | None = Field(None, description="Set to run inference with the adapter under HE.")
    tgsp: TGSPConfig | None = Field(None, description="Set to package the adapter as TGSP.")
    rl: RLConfig | None = Field(None, description="Reinforcement learning settings; used when mode is 'rlvr'.")

    @model_validator(mode="after")
    def _mode(self) -> RunConfig:
        if self.mode == "rlvr" and self.rl is None:
            self.rl = RLConfig()
        if self.mode == "sft" and self.rl is not None:
            raise ValueError("rl settings are only used with mode: rlvr")
        if self.rl is not None:
            if self.training.steps % self.rl.epochs:
                raise ValueError(f"training.steps ({self.training.steps}) must be a multiple of rl.epochs")
            if self.dp.enabled and self.rl.baseline == "running":
                raise ValueError(
                    "rl.baseline 'running' mixes rewards of different records, which DP cannot bound; use 'group'"
                )
        return self


def _read_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    text = path.read_text(encoding="utf-8")
    suffix = path.suffix.lower()
    try:
        if suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        elif suffix == ".toml":
            data = tomllib.loads(text)
        elif suffix == ".json":
            data = json.loads(text)
        else:
            raise ConfigError(f"{path}: unknown config format {suffix!r}; use .yaml, .yml, .toml or .json")
    except ConfigError:
        raise
    except Exception as exc:  # each parser has its own error type; all mean "not parseable"
        raise ConfigError(f"{path}: cannot parse: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, not {type(data).__name__}")
    return data


def env_overrides(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Nested overrides from ``TENSAFE_CONFIG__SECTION__FIELD=value`` variables."""
    environ = os.environ if environ is None else environ
    result: dict[str, Any] = {}
    for key, raw in sorted(environ.items()):
        if not key.startswith(ENV_PREFIX):
            continue
        parts = [p.lower() for p in key[len(ENV_PREFIX) :].split("__") if p]
        if not parts:
            continue
        try:
            value: Any = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        node = result
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{key}: conflicts with another override of {part!r}")
            node = child
        node[parts[-1]] = value
    return result


def _merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def validation_problems(exc: ValidationError) -> list[tuple[str, str]]:
    """``(dotted field path, message)`` for each error pydantic reports."""
    return [(".".join(str(p) for p in err["loc"]) or "(top level)", err["msg"]) for err in exc.errors()]


def build_config(
    data: Mapping[str, Any], *, source: str = "config", environ: Mapping[str, str] | None = None
) -> RunConfig:
    """Validate ``data`` (with environment overrides applied) into a :class:`RunConfig`."""
    merged = _merge(dict(data), env_overrides(environ))
    try:
        return RunConfig.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(f"{source} is invalid:", validation_problems(exc)) from None


def load_config(path: str | Path | None = None, *, environ: Mapping[str, str] | None = None) -> RunConfig:
    """Load a run config from a YAML/TOML/JSON file (or defaults when ``path`` is None).

    Relative data and output paths are resolved against the config file's folder.
    """
    if path is None:
        return build_config({}, source="default config", environ=environ)
    file = Path(path)
    data = _read_file(file)
    config = build_config(data, source=str(file), environ=environ)
    base = file.resolve().parent
    # A relative model path is a directory next to the config file, if there is one; else a hub id.
    model = config.model.path
    if model is not None and not Path(model).is_absolute() and (base / model).exists():
        config.model.path = str(base / model)
    if config.data.path is not None and not config.data.path.is_absolute():
        config.data.path = base / config.data.path
    if config.data.eval_path is not None and not config.data.eval_path.is_absolute():
        config.data.eval_path = base / config.data.eval_path
    if "output_dir" in data and not config.output_dir.is_absolute():
        config.output_dir = base / config.output_dir
    if config.he is not None and config.he.key_owner_state is not None and not config.he.key_owner_state.is_absolute():
        config.he.key_owner_state = base / config.he.key_owner_state
    if config.tgsp is not None:
        tgsp = config.tgsp
        for name in ("signing_key", "output", "recipient_key"):
            value = getattr(tgsp, name)
            if value is not None and not value.is_absolute():
                setattr(tgsp, name, base / value)
        tgsp.recipients = [p if p.is_absolute() else base / p for p in tgsp.recipients]
        tgsp.trusted_signers = [p if p.is_absolute() else base / p for p in tgsp.trusted_signers]
    return config

"""Optional features an implementation can declare in its ``capabilities`` set.

The orchestrator refuses work that needs a capability the backend lacks (for
example a DP run on a backend without ``dp_sgd``) instead of quietly doing
something weaker, and the conformance suite tests every declared capability.
"""

from __future__ import annotations

#: The backend implements DP-SGD: per-sample clipping and calibrated Gaussian noise.
DP_SGD = "dp_sgd"
#: ``SamplingParams.seed`` makes sampling reproducible.
SEEDED_SAMPLING = "seeded_sampling"
#: The backend implements the ``importance_sampling`` and ``ppo`` losses.
POLICY_LOSSES = "policy_losses"
#: ``MLBackend.sample_stream`` yields text while it is generated.
STREAMING = "streaming"

#: ``MLBackend.noised_gradient`` returns the gradient the last DP ``optim_step`` applied, so the
#: conformance suite can check clipping and noise (see docs/plugins.md, "Proving DP-SGD").
DP_PROBE = "dp_probe"

#: ``MLBackend.forward_backward_canaries`` accumulates crafted per-datum gradients (Dirac canaries), so a
#: white-box privacy audit can measure what one datum does to the noised gradient (see docs/privacy.md, "Auditing").
GRADIENT_CANARIES = "gradient_canaries"

#: ``MLBackend.encode_chat`` renders ``{"messages": [...]}`` records with the model's chat template.
CHAT_TEMPLATE = "chat_template"

#: ``MLBackend.lora_delta`` runs the base model with each LoRA module's delta supplied by a callback.
LORA_DELTA = "lora_delta"

#: ``MLBackend.join_workers`` joins the processes a launcher (torchrun) started for one run; ``optim_step`` then
#: sums every worker's clipped gradients and adds the DP noise once for all of them (see docs/distributed.md).
DISTRIBUTED = "distributed"

#: ``TGSPLoader.keygen`` writes a new signing pair and recipient pair (the server keeps one set per tenant).
TGSP_KEYGEN = "tgsp_keygen"

KNOWN: dict[str, str] = {
    DP_SGD: "per-sample gradient clipping and Gaussian noise (DP-SGD)",
    SEEDED_SAMPLING: "reproducible sampling from SamplingParams.seed",
    POLICY_LOSSES: "the importance_sampling and ppo losses",
    STREAMING: "streamed generation (sample_stream)",
    DP_PROBE: "the gradient the last DP optim_step applied (noised_gradient), for privacy conformance checks",
    GRADIENT_CANARIES: "crafted per-datum gradients (forward_backward_canaries), for white-box privacy audits",
    CHAT_TEMPLATE: "chat records through the model's chat template (encode_chat), trained on assistant turns",
    LORA_DELTA: "base model with LoRA deltas from a callback (read_lora, lora_delta), for HE-LoRA",
    DISTRIBUTED: "one run on several worker processes (join_workers): gradients summed, DP noise added once",
    TGSP_KEYGEN: "new signing and recipient key files (keygen), for keys a server holds per tenant",
}


def has(obj: object, capability: str) -> bool:
    """Whether ``obj`` declares ``capability``."""
    return capability in getattr(obj, "capabilities", frozenset())

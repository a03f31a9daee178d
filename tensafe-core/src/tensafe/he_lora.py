"""HE-LoRA: a LoRA product computed on an encrypted adapter, with no rotations.

Two parties, separated by bytes:

* the **key owner** holds the CKKS secret key and the plaintext adapter. It
  encrypts each module's A rows and B columns (:meth:`KeyOwner.encrypt_adapter`)
  and ships them, with the public parameters and public key only, to
* the **evaluator**, which runs the base model in plaintext. For each token
  and adapted module it computes, with plaintext-ciphertext products only,

  - ``c = Enc(A rows) * x + Enc(m)`` where each row's mask ``m_i`` is fresh,
    Gaussian and sums (over the row's slots) to a fresh Gaussian ``t_i``;
  - ``e = sum_i Enc(B column i) * t_i + Enc(M)`` with a fresh Gaussian mask ``M``,

  (the masks are fresh public-key encryptions, with random imaginary parts:
  they re-randomise what is sent, see THREAT_MODEL.md), and sends ``c`` and
  ``e`` (:class:`LoraRequest`). The key owner decrypts, sums each row's slots
  to ``w = A x + t``, sums ``e``'s segments to ``z = B t + M'`` and returns
  ``y = B w - z = B A x - M'`` plus a little flooding noise
  (:class:`LoraResponse`). The evaluator adds its ``M'`` back and scales:
  ``delta = (alpha / r) * (y + M')``.

Several rows (columns) share a ciphertext, each in its own segment of slots,
when a row is shorter than the slot count; a longer row is split into chunks.
The key owner sums segments in plaintext after decryption, which is what makes
rotations unnecessary: ``r`` plaintext-ciphertext products per token and
module when ``d`` equals the slot count, the least SIMD work possible.

``tensafe-he-seal/THREAT_MODEL.md`` says what each party sees, the statistical
hiding the masks give (:mod:`tensafe.he.hiding` computes it), and what HE
cannot protect here. Everything crosses between the parties as versioned,
size-checked byte frames through a :class:`LoraTransport`, one round trip for
all the modules of a token whose inputs are ready together
(:meth:`Evaluator.deltas`); the in-process transport still serialises every
message, so the evaluator's state never shares an object with the key owner's.
Masks can be encrypted ahead of time in worker processes (:mod:`tensafe.he.pool`).

The parts live in :mod:`tensafe.he`, one concern per module (packing, frames,
messages, key_owner, evaluator, state, hiding, pool); this module is their
public face and re-exports them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from tensafe.he import state as sealed_state
from tensafe.he.evaluator import Evaluator, Pad, PadMaker
from tensafe.he.frames import ADAPTER, FRAME_VERSION, MAX_FRAME, MAX_HEADER, OWNER, key_id, read_frame
from tensafe.he.hiding import MaskBits
from tensafe.he.key_owner import (
    DECRYPTION_LIMIT,
    FLOOD_BITS,
    KeyOwner,
    KeyRotationRequired,
    seal_unencrypted_state,
)
from tensafe.he.messages import InProcessTransport, LoraRequest, LoraResponse, LoraTransport, ModuleRequest
from tensafe.he.packing import LORA_LEVEL, TOKEN_SCALE_BITS, VALUE_ROOM_BITS, Layout, ModuleSpec, lora_scales

if TYPE_CHECKING:
    from tensafe.config import HEConfig
    from tensafe.interfaces import HEBackend

__all__ = [
    "ADAPTER",
    "DECRYPTION_LIMIT",
    "ENCRYPTED_ADAPTER_FILE",
    "FLOOD_BITS",
    "FRAME_VERSION",
    "LORA_LEVEL",
    "MAX_FRAME",
    "MAX_HEADER",
    "OWNER",
    "PROTOCOL",
    "TOKEN_SCALE_BITS",
    "VALUE_ROOM_BITS",
    "Evaluator",
    "InProcessTransport",
    "KeyOwner",
    "KeyRotationRequired",
    "Layout",
    "LoraRequest",
    "LoraResponse",
    "LoraTransport",
    "MaskBits",
    "ModuleRequest",
    "ModuleSpec",
    "Pad",
    "PadMaker",
    "adapter_marker",
    "in_process",
    "key_id",
    "lora_scales",
    "open_encrypted",
    "seal_unencrypted_state",
]


#: The file an HE-encrypted adapter has inside a TGSP package, and the manifest marker's protocol name.
ENCRYPTED_ADAPTER_FILE = "he_adapter.bin"
PROTOCOL = "tensafe-he-lora-2"


def adapter_marker(adapter: bytes, he_backend: str) -> dict[str, Any]:
    """The TGSP manifest's ``encrypted_adapter`` entry for a package carrying ``adapter``."""
    header, _ = read_frame(ADAPTER, adapter, "encrypted HE-LoRA adapter")
    return {
        "protocol": PROTOCOL,
        "he_backend": he_backend,
        "file": ENCRYPTED_ADAPTER_FILE,
        "key_id": header.get("key_id"),
        "modules": [ModuleSpec.from_json(m).name for m in header.get("modules", [])],
    }


def in_process(
    backend_factory: Callable[[], HEBackend], config: HEConfig, modules: Mapping[str, tuple[Any, Any, float]]
) -> tuple[KeyOwner, Evaluator]:
    """A key owner with fresh keys, its adapter encrypted, and an evaluator talking to it in process.

    The two parties get separate backend objects (separate contexts); only bytes pass between them.
    """
    owner = KeyOwner.create(backend_factory(), config)
    adapter = owner.encrypt_adapter(modules)
    evaluator = Evaluator(backend_factory(), adapter, InProcessTransport(owner))
    return owner, evaluator


def open_encrypted(
    backend_factory: Callable[[], HEBackend],
    adapter: bytes,
    key_owner_state: bytes,
    passphrase: str | bytes | None = None,
) -> Evaluator:
    """An evaluator for an encrypted adapter, talking in process to the key owner sealed in ``key_owner_state``.

    The passphrase defaults to the environment variable ``TENSAFE_HE_PASSPHRASE``.
    """
    if passphrase is None:
        passphrase = sealed_state.passphrase_from_env()
    owner = KeyOwner.load(backend_factory(), key_owner_state, passphrase)
    return Evaluator(backend_factory(), adapter, InProcessTransport(owner))

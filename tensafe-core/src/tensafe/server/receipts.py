"""Signed audit receipts: what a client keeps to show, later, that the server's audit chain was cut.

The head kept outside the database (``audit-head.json``) catches a cut made
through the database alone. Whoever can rewrite the whole data directory
(restore an old backup of the database and the head file together) can cut
both. A receipt, signed with an Ed25519 key derived from the master key and
handed to the client, is out of their reach: ``tensafe audit verify
--receipt`` fails when the chain no longer holds the record a receipt names.
"""

from __future__ import annotations

import base64
import json
import time

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from tensafe.api import AuditReceipt

DOMAIN = b"tensafe audit receipt\x00"


def _message(receipt: AuditReceipt) -> bytes:
    fields = receipt.model_dump(exclude={"signature"})
    return DOMAIN + json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()


class ReceiptSigner:
    """Signs receipts with the server's receipt key and checks receipts against it."""

    def __init__(self, seed: bytes) -> None:
        self._key = Ed25519PrivateKey.from_private_bytes(seed)
        self.public_key = base64.b64encode(self._key.public_key().public_bytes_raw()).decode()

    def issue(self, tenant_id: str, seq: int, head: str) -> AuditReceipt:
        unsigned = AuditReceipt(
            tenant_id=tenant_id, seq=seq, head=head, time=time.time(), public_key=self.public_key, signature=""
        )
        signature = base64.b64encode(self._key.sign(_message(unsigned))).decode()
        return unsigned.model_copy(update={"signature": signature})

    def problem(self, receipt: AuditReceipt) -> str | None:
        """Why ``receipt`` is not this server's (None when it is)."""
        if receipt.public_key != self.public_key:
            return f"receipt for record {receipt.seq} was signed by another key, not this server's"
        if not verify_signature(receipt):
            return f"receipt for record {receipt.seq} has an invalid signature (altered or forged)"
        return None


def verify_signature(receipt: AuditReceipt) -> bool:
    """Whether the receipt's signature holds under the key it names (a client checks the key is its server's)."""
    try:
        key = Ed25519PublicKey.from_public_bytes(base64.b64decode(receipt.public_key, validate=True))
        key.verify(base64.b64decode(receipt.signature, validate=True), _message(receipt))
    except (InvalidSignature, ValueError):
        return False
    return True


def chain_problems(receipt: AuditReceipt, hashes: dict[int, str]) -> list[str]:
    """Whether the chain (record hashes by sequence number) still holds the record the receipt names."""
    if receipt.seq == 0:
        return []
    held = hashes.get(receipt.seq)
    if held is None:
        return [
            f"a receipt the server signed shows record {receipt.seq}, but the chain ends at "
            f"{max(hashes, default=0)}: records removed"
        ]
    if held != receipt.head:
        return [f"record {receipt.seq} is not the one a signed receipt names: the chain was rewritten"]
    return []

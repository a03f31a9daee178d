"""TGSP: TenSafe's signed, encrypted adapter packages that carry a privacy certificate.

Signatures are hybrid (Ed25519 and ML-DSA-65, both must verify); encryption is
to one or more recipients with a hybrid key exchange (X25519 and ML-KEM-768)
and AES-256-GCM in authenticated 64 KiB chunks. SPEC.md describes the format
byte for byte.

::

    from tensafe_tgsp import keygen, pack, verify, unpack, inspect

    paths = keygen("keys", "acme")
    pack("run/adapter", "adapter.tgsp", signing_key=paths["signing_key"],
         recipients=[paths["recipient_public_key"]], base_model="my-base-model")
    manifest = verify("adapter.tgsp", [paths["signing_public_key"]])
    unpack("adapter.tgsp", recipient_key=paths["recipient_key"],
           trusted_signers=[paths["signing_public_key"]], destination="unpacked")

The names below are imported lazily, so importing this package (or its plugin
module) does not import cryptography.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.2.0"

_EXPORTS = {
    "pack": "tensafe_tgsp.format",
    "inspect": "tensafe_tgsp.format",
    "verify": "tensafe_tgsp.format",
    "unpack": "tensafe_tgsp.format",
    "keygen": "tensafe_tgsp.keys",
    "SigningKey": "tensafe_tgsp.keys",
    "SigningPublicKey": "tensafe_tgsp.keys",
    "RecipientKey": "tensafe_tgsp.keys",
    "RecipientPublicKey": "tensafe_tgsp.keys",
    "load_signing_key": "tensafe_tgsp.keys",
    "load_signing_public_key": "tensafe_tgsp.keys",
    "load_recipient_key": "tensafe_tgsp.keys",
    "load_recipient_public_key": "tensafe_tgsp.keys",
    "save_private_key": "tensafe_tgsp.keys",
    "save_public_key": "tensafe_tgsp.keys",
    "TGSPPackageLoader": "tensafe_tgsp.loader",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'tensafe_tgsp' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))

"""The ``tgsp`` TGSP loader: :class:`tensafe.interfaces.TGSPLoader` over :mod:`tensafe_tgsp.format`."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

from tensafe.capabilities import TGSP_KEYGEN
from tensafe.interfaces import TGSPLoader
from tensafe_tgsp import format as tgsp_format
from tensafe_tgsp import keys


class TGSPPackageLoader(TGSPLoader):
    """Opens TGSP packages: verify (both signatures, a trusted signer, policy) first, then decrypt.

    Every failure raises a :class:`tensafe_tgsp.errors.TGSPError`.
    """

    capabilities: ClassVar[frozenset[str]] = frozenset({TGSP_KEYGEN})

    def keygen(self, directory: Path, name: str) -> dict[str, Path]:
        """A new signing pair and recipient pair, unencrypted private keys (0600); refuses to overwrite."""
        return keys.keygen(directory, name)

    def pack(
        self,
        source: Path,
        output: Path,
        *,
        signing_key: Path,
        recipients: Sequence[Path],
        base_model: str,
        lora_config: Mapping[str, Any] | None = None,
        privacy_certificate: Mapping[str, Any] | None = None,
        passphrase: str | bytes | None = None,
        encrypted_adapter: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Package the adapter directory ``source`` (streamed, atomic); returns the manifest.

        ``encrypted_adapter`` marks a package whose adapter is itself HE-encrypted
        (see :func:`tensafe.he_lora.adapter_marker`); whoever opens it hands the
        encrypted adapter to the HE backend named there instead of loading weights.
        """
        return tgsp_format.pack(
            source,
            output,
            signing_key=signing_key,
            recipients=list(recipients),
            base_model=base_model,
            lora_config=lora_config,
            privacy_certificate=privacy_certificate,
            passphrase=passphrase,
            encrypted_adapter=encrypted_adapter,
        )

    def inspect(self, path: Path) -> dict[str, Any]:
        """The manifest, parsed and checked for form but NOT verified: do not trust it before :meth:`verify`."""
        return tgsp_format.inspect(path)

    def verify(
        self,
        path: Path,
        trusted_signers: Sequence[Path],
        *,
        base_model: str | None = None,
        now: dt.datetime | None = None,
    ) -> dict[str, Any]:
        """Check signatures, trust, the manifest and the policy without decrypting; returns the manifest."""
        return tgsp_format.verify(path, trusted_signers, base_model=base_model, now=now)

    def load(
        self,
        path: Path,
        *,
        recipient_key: Path,
        trusted_signers: Sequence[Path],
        destination: Path,
        allow_untrusted_signer: bool = False,
        base_model: str | None = None,
        passphrase: str | bytes | None = None,
        now: dt.datetime | None = None,
    ) -> dict[str, Any]:
        """Verify, then decrypt the adapter files into ``destination`` (atomically); returns the manifest.

        With ``allow_untrusted_signer`` the key embedded in the package is trusted for this one call:
        both signatures must still verify, but anyone could have made them.
        """
        signers: list[Any] = list(trusted_signers)
        if allow_untrusted_signer:
            signers.append(tgsp_format.embedded_signer(path))
        return tgsp_format.unpack(
            path,
            recipient_key=recipient_key,
            trusted_signers=signers,
            destination=destination,
            passphrase=passphrase,
            base_model=base_model,
            now=now,
        )

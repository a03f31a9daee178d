"""The TGSP exception tree.

Every failure of every tensafe-tgsp API raises a :class:`TGSPError`; errors of
the libraries underneath (``cryptography``'s ``InvalidTag`` and
``InvalidSignature``, ``struct.error``, JSON and Unicode errors, ``OSError``)
are translated at the boundary. All carry ``exit_code = 2``, so the ``tensafe``
CLI prints the message and exits with status 2, never a traceback.

::

    TGSPError
    ├── MalformedPackage          not a TGSP package, bad header/length/manifest/structure
    │   ├── UnsupportedVersion    a format version this reader does not know
    │   ├── TruncatedPackage      shorter than its header declares (also an IntegrityError)
    │   └── TrailingData          longer than its header declares (also an IntegrityError)
    ├── SignatureInvalid          a signature (either algorithm) does not verify
    ├── UntrustedSigner           validly signed, but not by any trusted key
    ├── NotARecipient             the package was not encrypted to this recipient key
    ├── IntegrityError            AEAD or hash failure: corruption, reordering, splicing, dropping
    ├── PolicyViolation           the package's signed policy forbids this use (expired, base model)
    ├── UnsafePath                a file path that could escape the destination, a link, a duplicate
    ├── KeyFileError              a key file is unreadable, malformed, or its passphrase is wrong
    ├── PackError                 pack() was given something it cannot package
    └── PackageIOError            the package or destination cannot be read or written
        └── DestinationExists     refusing to overwrite
"""

from __future__ import annotations

from tensafe.errors import TensafeError


class TGSPError(TensafeError):
    """Root of every error tensafe-tgsp raises."""

    exit_code = 2
    code = "tgsp_error"


class MalformedPackage(TGSPError):
    """The file is not a well-formed TGSP package."""

    code = "tgsp_malformed"


class UnsupportedVersion(MalformedPackage):
    """The package uses a format version this reader does not support."""

    code = "tgsp_unsupported_version"


class IntegrityError(TGSPError):
    """Authenticated decryption or a hash check failed: the bytes are not the ones that were packed."""

    code = "tgsp_integrity"


class TruncatedPackage(MalformedPackage, IntegrityError):
    """The package is shorter than its header declares (cut off, or payload chunks dropped)."""

    code = "tgsp_truncated"


class TrailingData(MalformedPackage, IntegrityError):
    """The package is longer than its header declares (bytes appended, or payload chunks inserted)."""

    code = "tgsp_trailing_data"


class SignatureInvalid(TGSPError):
    """A signature does not verify (the header, manifest or recipient block was altered)."""

    code = "tgsp_signature_invalid"


class UntrustedSigner(TGSPError):
    """The package is validly signed, but by a key that is not among the trusted signers."""

    code = "tgsp_untrusted_signer"


class NotARecipient(TGSPError):
    """The package was not encrypted to the given recipient key."""

    code = "tgsp_not_a_recipient"


class PolicyViolation(TGSPError):
    """The package's signed policy forbids this use (expired, or a base model it does not allow)."""

    code = "tgsp_policy_violation"


class UnsafePath(TGSPError):
    """A file entry could escape the destination or is not a plain file (absolute, ``..``, link, duplicate)."""

    code = "tgsp_unsafe_path"


class KeyFileError(TGSPError):
    """A key file cannot be read, is malformed, has the wrong kind, or its passphrase is wrong."""

    code = "tgsp_key_file"


class PackError(TGSPError):
    """``pack`` was given input it cannot package (bad manifest fields, unreadable or changing files)."""

    code = "tgsp_pack"


class PackageIOError(TGSPError):
    """The package, a source file or the destination cannot be read or written."""

    code = "tgsp_io"


class DestinationExists(PackageIOError):
    """The output already exists; TGSP never overwrites it."""

    code = "tgsp_destination_exists"


__all__ = [
    "DestinationExists",
    "IntegrityError",
    "KeyFileError",
    "MalformedPackage",
    "NotARecipient",
    "PackError",
    "PackageIOError",
    "PolicyViolation",
    "SignatureInvalid",
    "TGSPError",
    "TrailingData",
    "TruncatedPackage",
    "UnsafePath",
    "UnsupportedVersion",
    "UntrustedSigner",
]

"""Bodies tenants upload (TGSP packages, JSONL datasets): streamed to the scratch directory under a size cap.

The rest of the API reads bodies up to ``MAX_BODY_BYTES`` into memory; an
upload may be larger, so it is written to a private file as it arrives and
refused with 413 the moment it passes its cap, before anything is stored.
"""

from __future__ import annotations

import os
from pathlib import Path

from starlette.requests import Request

from tensafe.data import Record, parse_records
from tensafe.errors import PayloadTooLarge, UsageError

#: Largest dataset a tenant may upload.
MAX_DATASET_BYTES = 256 * 1024**2
#: Most records in one uploaded dataset.
MAX_DATASET_RECORDS = 10_000_000


async def receive(request: Request, destination: Path, limit: int) -> Path:
    """Write the request body to ``destination`` (mode 0600), refusing it past ``limit`` bytes."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"upload exceeds {limit} bytes")
    seen = 0
    with os.fdopen(os.open(destination, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as handle:
        async for chunk in request.stream():
            seen += len(chunk)
            if seen > limit:
                raise PayloadTooLarge(f"upload exceeds {limit} bytes")
            handle.write(chunk)
    if seen == 0:
        raise UsageError("the upload is empty")
    return destination


def parse_dataset(data: bytes) -> list[Record]:
    """The records of an uploaded JSONL dataset; errors name the line, never a server path."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"the dataset is not UTF-8 (byte {exc.start})") from None
    records = parse_records(text.splitlines(), "dataset", max_records=MAX_DATASET_RECORDS + 1)
    if len(records) > MAX_DATASET_RECORDS:
        raise UsageError(f"the dataset has more than {MAX_DATASET_RECORDS} records")
    return records

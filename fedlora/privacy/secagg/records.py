"""The protocol's payloads as Flower records.

Each stage is one round trip of Message-API `train` messages; a payload travels
as one ConfigRecord (`RECORD`, which names the stage) plus, for the masked
upload, one ArrayRecord (`ARRAY_RECORD`). Empty values (lists, str, bytes)
travel as their names under `EMPTY`, because Flower 1.42's
`ConfigRecord.count_bytes` fails on them.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from . import messages as m

RECORD = "secagg"              # ConfigRecord: the stage's payload
ARRAY_RECORD = "secagg-arrays"  # ArrayRecord: the masked vector (messages.ARRAY_KEYS)
EMPTY = "secagg-empty"         # list[str]: "<key>:<list|str|bytes>" for each empty value
_EMPTY_OF = {"list": list, "str": str, "bytes": bytes}


def to_config_record(values: Mapping[str, Any]) -> ConfigRecord:
    """Plain values (messages.check_wire_types) as a ConfigRecord, empty ones by name."""
    empty = {k: type(v).__name__ for k, v in values.items() if isinstance(v, (list, str, bytes)) and not v}
    record = ConfigRecord({k: v for k, v in values.items() if k not in empty})
    if empty:
        record[EMPTY] = [f"{k}:{kind}" for k, kind in empty.items()]
    return record


def from_config_record(record: Mapping[str, Any]) -> dict[str, Any]:
    """Inverse of `to_config_record`; lists come back as new Python lists."""
    out = {k: list(v) if isinstance(v, list) else v for k, v in record.items() if k != EMPTY}
    for entry in record.get(EMPTY, []):
        key, _, kind = entry.rpartition(":")
        out[key] = _EMPTY_OF[kind]()
    return out


def payload_records(payload: Mapping[str, Any]) -> dict[str, ConfigRecord | ArrayRecord]:
    """A protocol payload as the records of a message's RecordDict."""
    m.check_wire_types(payload)
    config, arrays = m.split_payload(payload)
    records: dict[str, ConfigRecord | ArrayRecord] = {RECORD: to_config_record(config)}
    if arrays:
        records[ARRAY_RECORD] = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})
    return records


def payload_of(content: RecordDict) -> dict[str, Any]:
    """The protocol payload in a message's content (the inverse of `payload_records`)."""
    if RECORD not in content.config_records:
        raise ValueError(f"message has no {RECORD!r} record")
    payload = from_config_record(content.config_records[RECORD])
    if ARRAY_RECORD in content.array_records:
        for key, array in content.array_records[ARRAY_RECORD].items():
            if key in m.ARRAY_KEYS:
                payload[key] = array.numpy()
    return payload

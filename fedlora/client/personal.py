"""Adapter tensors a site keeps for itself (FedSA-LoRA's B), across rounds and restarts.

They live in the node's Flower context state (which persists across the
rounds of one run) and, when the node configuration names a `state-dir`, in a
file there, so a restarted site process gets them back. The file is keyed by
the run configuration, so another experiment never picks up this one's B.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
from flwr.app import Context
from safetensors.numpy import load_file, save_file

from fedlora.arrays import State, from_record, to_record
from fedlora.privacy.budget import NODE_STATE_DIR

RECORD = "fedlora-personal-adapter"


def run_key(run_config) -> str:
    """Identifies the run (its configuration, less the resume switch)."""
    items = {k: v for k, v in dict(run_config).items() if k != "output.resume"}
    return hashlib.sha256(json.dumps(items, sort_keys=True).encode()).hexdigest()[:16]


def _file(context: Context) -> Path | None:
    folder = context.node_config.get(NODE_STATE_DIR)
    if not folder:
        return None
    return Path(str(folder)).expanduser() / f"personal-adapter-{run_key(context.run_config)}.safetensors"


def load_personal(context: Context, initial: State) -> State:
    """The site's kept tensors: from the context, else its disk, else `initial`."""
    if RECORD in context.state:
        kept = from_record(context.state[RECORD])
    elif (path := _file(context)) is not None and path.exists():
        kept = load_file(str(path))
    else:
        return initial
    if kept.keys() != initial.keys() or any(kept[k].shape != initial[k].shape for k in kept):
        raise ValueError("the site's kept adapter tensors do not match its model (was lora.rank changed?)")
    return kept


def save_personal(context: Context, tensors: State) -> None:
    context.state[RECORD] = to_record(tensors)
    path = _file(context)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp))
        os.replace(tmp, path)

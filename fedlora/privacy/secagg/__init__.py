"""SecAgg+-style secure aggregation, transport-agnostic (Bonawitz et al. 2017; Bell et al. 2020).

The server learns only the sum of the clients' quantized vectors; fewer than
``threshold`` colluding neighbours plus an honest-but-curious server learn
nothing about one client's vector. Not covered: a malicious server (key
substitution, inconsistent dropout reports), poisoning, attacks on the final model.

Stages (payloads are plain dicts, keys in ``messages``):
    server.setup_requests()                 -> client.advertise_keys(req)
    server.share_keys_requests(replies)     -> client.share_keys(req)
    server.masked_input_requests(replies)   -> client.masked_input(req, vector)
    server.unmask_requests(replies)         -> client.unmask(req)
    server.aggregate(replies)               -> SecAggResult

fedlora's use of it (fedlora/server/secure_collect.py, fedlora/client/secure.py):
``records`` (payloads as Flower records), ``updates`` (an adapter update as the
vector a site masks), ``session`` (the run's [secagg] section as protocol
parameters), ``distributed_dp`` (noise before masking and its accounting).
"""

from . import messages
from .client import SecAggClient
from .config import SecAggConfig, SessionParams
from .encoding import Quantizer, bytes_per_param, choose_modulus_bits, pack, unpack
from .errors import (
    ProtocolViolation,
    SecAggAbort,
    SecAggConfigError,
    SecAggError,
    ShareDecryptionError,
    ShareVerificationError,
)
from .graph import default_degree, default_threshold, neighbour_graph
from .server import SecAggResult, SecAggServer
from .simulate import run_in_memory

__all__ = [
    "messages",
    "SecAggClient",
    "SecAggConfig",
    "SessionParams",
    "Quantizer",
    "bytes_per_param",
    "choose_modulus_bits",
    "pack",
    "unpack",
    "ProtocolViolation",
    "SecAggAbort",
    "SecAggConfigError",
    "SecAggError",
    "ShareDecryptionError",
    "ShareVerificationError",
    "default_degree",
    "default_threshold",
    "neighbour_graph",
    "SecAggResult",
    "SecAggServer",
    "run_in_memory",
]

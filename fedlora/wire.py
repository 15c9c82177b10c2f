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

# ConfigRecord (site -> server): who answered.
SITE = "site"
SITE_NAME = "name"
SKIPPED_ROWS = "skipped-rows"

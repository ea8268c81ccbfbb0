"""The defaults of the upscale options, in one place: UpscaleOptions (options.py) uses them, and the command line
shows them in its help without importing the options model (so that `--help` answers at once)."""

ROUTER_RANK = 8
EXPERT_RANK = 128
TOP_K = 1
# how tokens pick experts (modeling_smile.ROUTING_MODES), or auto: prompt-model for a decoder-only causal LM,
# faithful (the paper's per-token, per-layer router) for any other architecture (plan.resolve_routing)
ROUTING = "auto"
CAUSAL_LM_ROUTING = "prompt-model"  # what auto picks for a decoder-only causal LM (docs/results/routing.md)
ROUTING_TEMPERATURE = 1.0
DTYPE = "auto"  # the base's
MAX_SHARD_SIZE = 5_000_000_000
SVD = "auto"  # randomized where the rank is small (factorize.AUTO_RANK_FRACTION), exact elsewhere
SEED = 0
DEVICE = "auto"
SPECTRUM_RANK = 32  # smile inspect: singular values computed at least, per update

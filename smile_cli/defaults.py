"""The defaults of the upscale options, in one place: UpscaleOptions (options.py) uses them, and the command line
shows them in its help without importing the options model (so that `--help` answers at once)."""

ROUTER_RANK = 8
EXPERT_RANK = 128
TOP_K = 1
# how tokens pick experts (modeling_smile.ROUTING_MODES), or auto: the mode the evidence supports for the base's
# architecture (plan.resolve_routing). Today faithful (the paper's per-token, per-layer router) for every
# architecture: on a real pretrained LM it keeps more of the experts' skill than the prompt modes
# (docs/results/real.md), and it is the mode serving engines can run (README, Serve). The prompt modes win on the
# tiny task models only (docs/results/routing.md) and stay available by name.
ROUTING = "auto"
CAUSAL_LM_ROUTING = "faithful"  # what auto picks for a decoder-only causal LM, and why (recorded as routing_auto)
CAUSAL_LM_ROUTING_WHY = "the per-token router keeps the most on a real pretrained LM and serves in vLLM"
ROUTING_TEMPERATURE = 1.0
DTYPE = "auto"  # the base's
MAX_SHARD_SIZE = 5_000_000_000
SVD = "auto"  # randomized where the rank is small (factorize.AUTO_RANK_FRACTION), exact elsewhere
SEED = 0
DEVICE = "auto"
SPECTRUM_RANK = 32  # smile inspect: singular values computed at least, per update

"""The defaults of the upscale options, in one place: UpscaleOptions (options.py) uses them, and the command line
shows them in its help without importing the options model (so that `--help` answers at once)."""

ROUTER_RANK = 8
EXPERT_RANK = 128
TOP_K = 1
# how tokens pick experts (modeling_smile.ROUTING_MODES), or auto: the mode the evidence supports for the base's
# architecture (planning.resolve_routing). For a decoder-only causal LM, likelihood-prompt (one expert per prompt, the
# one under which the model is most confident of its next token): on a real pretrained LM with LoRA experts it keeps
# 87% of the experts' accuracy where faithful keeps 22%, prompt-model 33% and mergekit-moe 65%, and it is the best
# zero-shot mode on the hard task set (docs/results/routing_modes.md, README Routing); the output also records
# faithful as what serving engines run (config.json smile_engine_routing, output.engine_routing), since they cannot
# keep one mix per request. Faithful (the paper's per-token router) for every other architecture.
ROUTING = "auto"
CAUSAL_LM_ROUTING = "likelihood-prompt"  # what auto picks for a decoder-only causal LM, and why (routing_auto)
CAUSAL_LM_ROUTING_WHY = (
    "one expert per prompt, the one the model is most confident under, keeps the most on a real pretrained LM "
    "(vLLM serves it as faithful)"
)
ROUTING_TEMPERATURE = 1.0
DTYPE = "auto"  # the base's
MAX_SHARD_SIZE = 5_000_000_000
SVD = "auto"  # randomized where the rank is small (factorize.AUTO_RANK_FRACTION), exact elsewhere
SEED = 0
DEVICE = "auto"
SPECTRUM_RANK = 32  # smile inspect: singular values computed at least, per update

"""What smile reads: every input model, opened lazily (headers first, one tensor at a time), one idea per module.

- safetensors_format: the file format, read (header parsed and checked, one tensor read) and written (a header);
- checkpoint: the Checkpoint every input model is, and its fingerprint; checks: config and custom-code policy,
  index, quantization, finite values; local: a model folder opened; pickles: pickle weights (--allow-pickle);
- resolve: what a ref names (a folder, a Hub id's snapshot); hub_checkpoint: a Hub id opened from its remote
  headers; hub_stream: Hub bytes and calls, one retry policy; hub_integrity: every byte checked against the
  published sha256; hub_session: a run's Hub inputs as one object;
- lora: PEFT LoRA adapters; experts: the expert interface, and `open_input`, the one dispatcher.
"""

"""The bundled demo's tiny task models: a character-level Llama base and experts fine-tuned on synthetic tasks,
trained once and cached (scripts/demo.py, the tests that train models, benchmarks/quality).

tasks      the character vocabulary, the task generators, held-out splits, the generic pre-training mixture
train      the model config, pre-training, full and LoRA fine-tuning
models     build_or_load (the cache), load, held_out, save_char_tokenizer
evaluate   exact-match accuracy with batched greedy decoding
merging    simple average, task arithmetic, TIES (the plain merges SMILE is compared with)
"""

"""Learning: turning approved sessions (and environment rewards) into adapter weights.

Owns the training loop, the learning rules (opsd, sft, notes, grpo), probes, the promotion
gate and consolidation. May import config, model, store and envs; never serve or bench.
"""

"""Recipes: whole runs built from the library (train, evaluate, register, plot), as functions
that the commands call after parsing their arguments.

Owns grind.py (GRPO in an environment, with its optional supervised warm-up). May import
config, model, store, envs, learn and dream; imported only by commands (`cli.py`,
`*_cli.py`) and benchmarks.
"""

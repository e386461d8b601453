"""Dreaming: the model, with a session in its context, writes practice tasks about what it
saw; each task becomes a grindable environment (`DreamEnv`), passes a gate or is kept
with the reason it was rejected, and the model without the session trains against the
ones that passed (OPSD with the session as teacher on the dreamed tasks, or GRPO on their
rewards). The adapter that results goes through consolidation's registry and gate.

Owns: tasks.py (writing and parsing tasks), env.py (DreamEnv and its checkers), validity.py
(the per-environment gate on a task's validity, before any training; the promotion gate on
an adapter is learn/gate.py), run.py (a dream run: write, gate, train, persist), cli.py.
May import: model, store, envs, learn. Nothing below imports dream.
"""

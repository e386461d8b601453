"""onthejob: a language model that learns on the job.

Layers, lowest first (a layer imports only layers below it):
  config -> model -> store -> envs -> learn -> dream -> recipes -> serve -> bench -> cli
The commands (`cli.py`, `*_cli.py` in any package) are the top layer. docs/ARCHITECTURE.md
says what each package owns and may import.
"""

__version__ = "0.1.0"

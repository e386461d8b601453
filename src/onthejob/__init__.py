"""onthejob: a language model that learns on the job.

Layers, lowest first (a layer imports only layers below it):
  config -> model -> store -> envs -> learn -> dream -> serve -> bench -> cli
"""

__version__ = "0.1.0"

"""The model layer: loading weights and tokenizer, the one chat renderer, the one generation
path. Imports only onthejob.config; everything above builds on it."""

from onthejob.model.chat import end_of_turn_ids, render_ids, render_text, validate_messages
from onthejob.model.generate import (
    Completion,
    ContextLengthError,
    SamplingParams,
    check_fits,
    generate,
    stream,
)
from onthejob.model.load import (
    DEFAULT_MODEL_NAME,
    LoadedModel,
    ModelError,
    default_model_dir,
    load_model,
    load_tokenizer,
    tiny_model,
)

__all__ = [
    "DEFAULT_MODEL_NAME", "Completion", "ContextLengthError", "LoadedModel", "ModelError",
    "SamplingParams", "check_fits", "default_model_dir", "end_of_turn_ids", "generate",
    "load_model", "load_tokenizer", "render_ids", "render_text", "stream", "tiny_model",
    "validate_messages",
]

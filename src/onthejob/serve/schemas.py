"""Request bodies. Unknown fields are refused (400), so a typo is never silently ignored, and
types are strict, as OpenAI's are: "8" is not a number, true is not 1, "yes" is not a boolean.
OpenAI fields that onthejob does not implement are accepted only at their neutral value."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

MAX_MESSAGES = 1024
MAX_STOP_LENGTH = 64


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class TextPart(Strict):
    type: Literal["text"]
    text: str


class ChatMessage(Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = Field(default=None, max_length=64)
    tool_calls: list[dict[str, Any]] | None = Field(default=None, max_length=64)
    tool_call_id: str | None = Field(default=None, max_length=128)

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatRequest(Strict):
    model: str = Field(max_length=256)
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = Field(default=None, allow_inf_nan=False)
    top_p: float | None = Field(default=None, allow_inf_nan=False)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    stream: bool = False
    stream_options: dict[str, bool] | None = None
    n: Literal[1] = 1
    metadata: dict[str, str] | None = None
    user: str | None = Field(default=None, max_length=256)
    presence_penalty: Literal[0, 0.0] | None = None
    frequency_penalty: Literal[0, 0.0] | None = None
    logprobs: Literal[False] | None = None
    response_format: dict[str, Literal["text"]] | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > 4 or any(not s or len(s) > MAX_STOP_LENGTH for s in stops):
            raise ValueError(f"stop takes at most 4 non-empty strings of at most "
                             f"{MAX_STOP_LENGTH} characters")
        return stops

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is not None and (len(value) > 16 or any(len(k) > 64 or len(v) > 512
                                                         for k, v in value.items())):
            raise ValueError("metadata takes at most 16 keys (64 chars) with values of 512 chars")
        return value


class ReviewRequest(Strict):
    verdict: Literal["up", "down"]
    text: str = Field(default="", max_length=20_000)


class SessionCreate(Strict):
    title: str | None = Field(default=None, max_length=200)


class TenantCreate(Strict):
    name: str = Field(max_length=64)
    allow_shared: bool = False


class KeyCreate(Strict):
    admin: bool = False


class TenantUpdate(Strict):
    allow_shared: bool  # false withdraws consent to shared learning


def validation_message(exc: ValidationError) -> tuple[str, str | None]:
    """A one-line reason and the offending field, from pydantic's error list."""
    errors = exc.errors()
    first = errors[0]
    where = ".".join(str(p) for p in first["loc"]) or None
    message = first["msg"]
    if first["type"] == "extra_forbidden":
        message = "unknown field (not part of the API)"
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return f"{where}: {message}{more}" if where else message + more, where

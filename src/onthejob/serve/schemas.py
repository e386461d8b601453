"""Request bodies. Unknown fields are refused (400), so a typo is never silently ignored, and
types are strict, as OpenAI's are: "8" is not a number, true is not 1, "yes" is not a boolean.
OpenAI fields that onthejob does not implement are accepted only at their neutral value."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

MAX_MESSAGES = 1024
MAX_STOP_LENGTH = 64


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class TextPart(Strict):
    type: Literal["text"]
    text: str


# Content parts OpenAI defines for inputs this text-only model cannot read.
NON_TEXT_PARTS = ("image_url", "input_audio", "file", "image", "audio", "video_url")


def _text_parts(value: Any) -> Any:
    """A list content's parts as TextPart, with a clear refusal of non-text parts."""
    if not isinstance(value, list):
        return value
    parts = []
    for i, part in enumerate(value):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in NON_TEXT_PARTS:
            raise PydanticCustomError(
                "text_only", "part {i} is of type '{kind}', but this model takes text only: "
                "send the content as a string or as parts of type 'text'", {"i": i, "kind": kind})
        parts.append(TextPart.model_validate(part))
    return parts


class FunctionDef(Strict):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = Field(default=None, max_length=4096)
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(Strict):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(Strict):
    name: str = Field(min_length=1, max_length=64)


class NamedToolChoice(Strict):
    type: Literal["function"]
    function: NamedFunction


class ChatMessage(Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = Field(default=None, max_length=64)
    tool_calls: list[dict[str, Any]] | None = Field(default=None, max_length=64)
    tool_call_id: str | None = Field(default=None, max_length=128)

    @field_validator("content", mode="before")
    @classmethod
    def _content(cls, value: Any) -> Any:
        return _text_parts(value)

    @model_validator(mode="after")
    def _needs_content(self) -> ChatMessage:
        # As OpenAI: only an assistant message that calls tools may leave its content out.
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise PydanticCustomError(
                "missing_content", "a {role} message needs content (a string or text parts); "
                "only an assistant message with tool_calls may have content null",
                {"role": self.role})
        return self

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
    logprobs: bool | None = None
    top_logprobs: int | None = None
    response_format: dict[str, Literal["text"]] | None = None
    tools: list[Tool] | None = Field(default=None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> ChatRequest:
        if self.stream_options is not None and not self.stream:
            raise PydanticCustomError("stream_options", "only allowed when stream is true")
        return self

    @model_validator(mode="after")
    def _tool_choice_names_a_tool(self) -> ChatRequest:
        if isinstance(self.tool_choice, NamedToolChoice):
            names = {t.function.name for t in self.tools or ()}
            if self.tool_choice.function.name not in names:
                raise PydanticCustomError(
                    "tool_choice", "names the function '{name}', which is not in tools",
                    {"name": self.tool_choice.function.name})
        elif self.tool_choice == "required" and not self.tools:
            raise PydanticCustomError("tool_choice", "'required' needs tools")
        return self

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


# The field that a check on the whole request is about.
_REQUEST_CHECKS = {"stream_options": "stream_options", "tool_choice": "tool_choice"}


def validation_message(exc: ValidationError) -> tuple[str, str | None]:
    """A one-line reason and the offending field, from pydantic's error list."""
    errors = exc.errors()
    first = errors[0]
    where = ".".join(str(p) for p in first["loc"]) or None
    message = first["msg"]
    if first["type"] == "extra_forbidden":
        message = "unknown field (not part of the API)"
    elif first["type"] in _REQUEST_CHECKS:  # a check on a whole object names its field
        where = _REQUEST_CHECKS[first["type"]] or where
    elif first["type"] == "missing_content":
        where = f"{where}.content"
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return f"{where}: {message}{more}" if where else message + more, where

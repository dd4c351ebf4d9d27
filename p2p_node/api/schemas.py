"""Request bodies of the OpenAI-compatible and rerank endpoints, validated with bounds.

Fields the official client sends are accepted; fields we cannot honour are refused
with a 400 naming them rather than silently ignored (a client asking for `n=3` must
not get one answer and believe it has three).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_STOP_SEQUENCES = 4
MAX_STOP_LENGTH = 256
MAX_TOKENS_LIMIT = 1_000_000  # the model's context window is the real bound, checked later


class _Body(BaseModel):
    # Unknown fields are tolerated: clients send vendor extensions (user, metadata...).
    model_config = ConfigDict(extra="allow")


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(BaseModel):
    include_usage: bool = False


class _SamplingBody(_Body):
    model: str | None = None
    max_tokens: Annotated[int, Field(ge=1, le=MAX_TOKENS_LIMIT)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    n: Annotated[int, Field(ge=1, le=1)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = None
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = None
    # vLLM's extension: each streamed choice carries the ids of its tokens, which lets the
    # caller continue the answer exactly elsewhere if this server dies mid-stream.
    return_token_ids: bool = False

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else (value or [])
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed")
        if any(not s or len(s) > MAX_STOP_LENGTH for s in stops):
            raise ValueError(f"stop sequences must be 1 to {MAX_STOP_LENGTH} characters long")
        return value

    def stop_sequences(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionBody(_SamplingBody):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Annotated[int, Field(ge=1, le=MAX_TOKENS_LIMIT)] | None = None
    tools: list[Any] | None = None
    logprobs: bool | None = None
    response_format: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _refuse_unsupported(self) -> ChatCompletionBody:
        if self.tools:
            raise ValueError("tools are not supported by this node's models")
        if self.logprobs:
            raise ValueError("logprobs are not supported")
        if self.response_format and self.response_format.get("type") not in (None, "text"):
            raise ValueError("only response_format type 'text' is supported")
        return self

    def token_budget(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionBody(_SamplingBody):
    prompt: str | list[str]
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None

    @model_validator(mode="after")
    def _refuse_unsupported(self) -> CompletionBody:
        if isinstance(self.prompt, list) and len(self.prompt) != 1:
            raise ValueError("exactly one prompt per request is supported")
        if self.echo or self.logprobs or self.suffix:
            raise ValueError("echo, logprobs and suffix are not supported")
        return self

    def prompt_text(self) -> str:
        return self.prompt[0] if isinstance(self.prompt, list) else self.prompt


class EmbeddingBody(_Body):
    input: str | list[str]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int, Field(ge=1)] | None = None

    @field_validator("input")
    @classmethod
    def _non_empty(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and not value:
            raise ValueError("input must contain at least one string")
        if isinstance(value, list) and len(value) > 2048:
            raise ValueError("at most 2048 inputs per request")
        texts = [value] if isinstance(value, str) else value
        if any(not text for text in texts):
            raise ValueError("inputs must be non-empty strings")
        return value

    def texts(self) -> tuple[str, ...]:
        return (self.input,) if isinstance(self.input, str) else tuple(self.input)


class RerankDocument(BaseModel):
    text: str


class RerankBody(_Body):
    query: str = Field(min_length=1)
    documents: list[str | RerankDocument] = Field(min_length=1, max_length=10_000)
    model: str | None = None
    top_n: Annotated[int, Field(ge=1)] | None = None
    return_documents: bool = True

    def document_texts(self) -> tuple[str, ...]:
        return tuple(d if isinstance(d, str) else d.text for d in self.documents)


class ModelActionBody(_Body):
    model: str = Field(min_length=1)
    backend_id: str | None = None

"""The HTTP requests the server accepts: OpenAI's completions and chat, and Megatron's ``/api``.

Strict pydantic models on the CLI's types (:mod:`cp_infer.schema`: a prompt is one of its turns,
text or token ids): unknown fields are refused by name, types are not coerced, and a field we
cannot honour gets a message naming it instead of being ignored.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from cp_infer.schema import Turn

__all__ = [
    "ChatRequest", "CompletionRequest", "DetokenizeRequest", "MegatronRequest", "TokenizeRequest",
    "first_error",
]  # fmt: skip


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    model: str | None = None
    temperature: float = Field(1.0, ge=0.0, le=100.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int = 0
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=16)  # choices: each a request of its own (seed + i)
    user: str | None = None  # the client's label for the caller: logged, not used
    # up to 4 strings; the text ends before the first one generated (finish_reason "stop")
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None  # vLLM's: more end-of-sequence ids

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        strings = [v] if isinstance(v, str) else v or []
        if len(strings) > 4:
            raise ValueError(f"at most 4 stop sequences, got {len(strings)}")
        if any(not s for s in strings):
            raise ValueError("a stop sequence must not be empty")
        return v

    @field_validator("stop_token_ids")
    @classmethod
    def _stop_ids(cls, v):
        if v is not None and any(t < 0 for t in v):
            raise ValueError("token ids are >= 0")
        return v

    @property
    def stops(self) -> tuple[str, ...]:
        """The stop strings, as a tuple (none: empty)."""
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    @field_validator("temperature", "top_p", mode="before")
    @classmethod
    def _numbers(cls, v):  # JSON has one number type: 1 is as good a temperature as 1.0
        if isinstance(v, int) and not isinstance(v, bool):
            return float(v)
        return v


class CompletionRequest(_Sampling):
    """``POST /v1/completions``: a prompt as text or as token ids, typed as one turn of the
    CLI's requests (:data:`cp_infer.schema.Turn`), so both refuse alike."""

    prompt: Turn
    max_tokens: int = Field(16, ge=0)  # 0: score the prompt (with echo), generate nothing
    logprobs: int | None = Field(None, ge=0, le=20)  # alternatives per position
    echo: bool = False  # the prompt comes back before the answer (and its logprobs, if asked)

    @model_validator(mode="after")
    def _no_streamed_prompt_logprobs(self):
        if self.max_tokens == 0 and not (self.echo and not self.stream):
            raise ValueError("max_tokens: 0 only scores the prompt: set echo: true (and no stream)")
        if self.stream and self.echo and self.logprobs is not None:
            raise ValueError(
                "logprobs: the prompt's (echo: true) are not streamed; ask without streaming"
            )
        return self


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(_Sampling):
    """``POST /v1/chat/completions``: messages through the checkpoint's chat template."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)

    @property
    def echo(self) -> bool:  # chat never echoes the prompt
        return False

    @model_validator(mode="after")
    def _logprobs(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs: needs logprobs: true")
        return self

    @property
    def budget(self) -> int:
        return self.max_completion_tokens or self.max_tokens or 16


_MEGATRON_UNSUPPORTED = {  # field: the value that means "off" (accepted), anything else is not
    "beam_width": None,
    "length_penalty": 1.0,
    "top_p_decay": 0.0,
    "top_p_bound": 0.0,
    "stop_on_eol": False,
    "stop_on_double_eol": False,
    "prevent_newline_after_colon": False,
}


class MegatronRequest(BaseModel):
    """``PUT /api``: the fields of Megatron-LM's text generation server, with its defaults."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    prompts: list[str] = Field(min_length=1, max_length=128)
    tokens_to_generate: int = Field(64, ge=0)
    temperature: float = Field(1.0, gt=0.0, le=100.0)
    top_k: int = Field(0, ge=0, le=1000)
    top_p: float = Field(0.0, ge=0.0, le=1.0)
    add_BOS: bool = False
    logprobs: bool = False
    random_seed: int = Field(-1, ge=-1)
    stop_token: int | None = None
    no_log: bool = False
    beam_width: int | None = None
    length_penalty: float = 1.0
    top_p_decay: float = 0.0
    top_p_bound: float = 0.0
    stop_on_eol: bool = False
    stop_on_double_eol: bool = False
    prevent_newline_after_colon: bool = False

    @field_validator("temperature", "top_p", "length_penalty", "top_p_decay", "top_p_bound",
                     mode="before")  # fmt: skip
    @classmethod
    def _numbers(cls, v):
        if isinstance(v, int) and not isinstance(v, bool):
            return float(v)
        return v

    @model_validator(mode="after")
    def _supported(self):
        for name, off in _MEGATRON_UNSUPPORTED.items():
            if getattr(self, name) != off:
                raise ValueError(f"{name} is not supported by this server; leave it out")
        if self.tokens_to_generate == 0 and not self.logprobs:
            raise ValueError("tokens_to_generate=0 only scores the prompts: set logprobs=true")
        if self.top_k > 0 and self.top_p > 0:
            raise ValueError("cannot set both top_k and top_p sampling")
        if any(len(p) == 0 for p in self.prompts) and not self.add_BOS:
            raise ValueError("empty prompts require add_BOS=true")
        return self


class TokenizeRequest(_Strict):
    """``POST /tokenize`` (vLLM's): a prompt's tokens, or a chat's through its template."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _one(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt and messages")
        return self


class DetokenizeRequest(_Strict):
    """``POST /detokenize`` (vLLM's): token ids to text."""

    model: str | None = None
    tokens: list[int] = Field(min_length=1)


def first_error(e) -> tuple[str, str | None]:
    """(message, field) of a pydantic ValidationError, for a one-line 400."""
    err = e.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or None
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        msg = f"unknown field {where!r}: this server does not support it"
    elif where:
        msg = f"{where}: {msg}"
    return msg, where

"""The HTTP requests the server accepts: OpenAI's completions and chat, Megatron's ``/api`` and
vLLM's ``/tokenize`` and ``/detokenize``.

Strict pydantic models on the CLI's types (:mod:`cp_infer.schema`): unknown fields are refused
by name, types are not coerced, and a field we cannot honour gets a message naming it instead
of being ignored. Every field is bounded (a seed is a 64-bit integer, a token id fits int32,
numbers are finite) so that no value reaches arithmetic that cannot hold it. The handlers take
these models as their declared bodies, so ``/openapi.json`` documents them.

Extensions beside OpenAI's fields, as vLLM names them: ``top_k``, ``min_tokens``,
``ignore_eos``, ``stop_token_ids`` and ``stream_options.continuous_usage_stats``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    StrictInt,
    Tag,
    field_validator,
    model_validator,
)

from cp_infer.schema import (
    INT32_MAX,
    INT64_MAX,
    NOT_UNICODE,
    Seed,
    TokenId,
    TokenIds,
    text_field,
)

__all__ = [
    "ChatRequest", "CompletionRequest", "DetokenizeRequest", "MegatronRequest", "TokenizeRequest",
    "first_error",
]  # fmt: skip

MAX_PROMPTS = 128  # prompts in one batch request (each is a request of its own)
MAX_TEXT = 1 << 22  # characters of one text field: far past any context this serves
Count = Annotated[StrictInt, Field(ge=0, le=INT32_MAX)]


def _prompt_kind(value: Any) -> str | None:
    if isinstance(value, str):
        return "text"
    if isinstance(value, list):
        first = value[0] if value else None
        return "texts" if isinstance(first, str) else "batch" if isinstance(first, list) else (
            "token_ids")  # fmt: skip
    return None


#: A completions prompt, in every form OpenAI accepts: text, a list of texts, token ids, or a
#: list of lists of token ids (a list is a batch: one choice per prompt).
Prompt = Annotated[
    Annotated[text_field(min_length=1, max_length=MAX_TEXT), Tag("text")]
    | Annotated[list[text_field(min_length=1, max_length=MAX_TEXT)],
                Field(min_length=1, max_length=MAX_PROMPTS), Tag("texts")]
    | Annotated[TokenIds, Tag("token_ids")]
    | Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_PROMPTS), Tag("batch")],
    Discriminator(
        _prompt_kind,
        custom_error_type="prompt_type",
        custom_error_message="a prompt is text, a list of texts, a list of token ids or a list "
        "of lists of token ids",
    ),
]  # fmt: skip


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class StreamOptions(_Strict):
    include_usage: bool = False  # a last chunk with the usage of the whole request
    continuous_usage_stats: bool = False  # vLLM's: the usage so far in every chunk


def _floats(*names: str):
    """JSON has one number type: 1 is as good a temperature as 1.0."""

    def to_float(cls, v):
        if isinstance(v, int) and not isinstance(v, bool):
            return float(v)
        return v

    return field_validator(*names, mode="before")(classmethod(to_float))


class _Sampling(_Strict):
    model: text_field(max_length=256) | None = None
    temperature: float = Field(1.0, ge=0.0, le=100.0, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    top_k: int = Field(0, ge=-1, le=INT32_MAX)  # vLLM's: 0 or -1 keep every token
    # 64-bit, as OpenAI's; None: fresh randomness for every request
    seed: Seed | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=16)  # choices: each a request of its own (seed + i)
    user: text_field(max_length=256) | None = None  # logged, not used
    # up to 4 strings; the text ends before the first one generated (finish_reason "stop")
    # one string or a list: kept as the list (at most 4; maxItems documents it)
    stop: (
        Annotated[list[text_field(max_length=1024)], Field(json_schema_extra={"maxItems": 4})]
        | None
    ) = None
    stop_token_ids: Annotated[list[TokenId], Field(max_length=64)] | None = None  # vLLM's
    ignore_eos: bool = False  # vLLM's: the checkpoint's EOS does not end the answer
    min_tokens: Count = 0  # vLLM's: no EOS, stop token or stop string before this many
    # vLLM's: special tokens (a chat model's end-of-turn <|im_end|>) have no text in the answer
    skip_special_tokens: bool = True

    _numbers = _floats("temperature", "top_p")

    @field_validator("stop", mode="before")
    @classmethod
    def _one_stop(cls, v):
        return [v] if isinstance(v, str) else v

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        if v is not None and len(v) > 4:
            raise ValueError(f"at most 4 stop sequences, got {len(v)}")
        if any(not s for s in v or ()):
            raise ValueError("a stop sequence must not be empty")
        return v

    @model_validator(mode="after")
    def _stream_options(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options: only with stream: true")
        return self

    @property
    def stops(self) -> tuple[str, ...]:
        """The stop strings, as a tuple (none: empty)."""
        return tuple(self.stop or ())

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    @property
    def continuous_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.continuous_usage_stats


class CompletionRequest(_Sampling):
    """``POST /v1/completions``: one prompt or a batch (:data:`Prompt`); ``n`` choices of each,
    numbered prompt by prompt (prompt i's choice j is ``i * n + j``), as OpenAI does."""

    prompt: Prompt
    max_tokens: Count = 16  # 0: score the prompt (with echo), generate nothing
    logprobs: int | None = Field(None, ge=0, le=20)  # alternatives per position
    echo: bool = False  # the prompt comes back before the answer (and its logprobs, if asked)
    # vLLM's: a text prompt gets the tokenizer's special tokens (BOS), as tokenizer(prompt) does
    add_special_tokens: bool = True

    @model_validator(mode="after")
    def _checks(self):
        if self.max_tokens == 0 and not (self.echo and not self.stream):
            raise ValueError("max_tokens: 0 only scores the prompt: set echo: true (and no stream)")
        if self.stream and self.echo and self.logprobs is not None:
            raise ValueError(
                "logprobs: the prompt's (echo: true) are not streamed; ask without streaming"
            )
        if self.min_tokens > max(self.max_tokens, 1):
            raise ValueError(
                f"min_tokens ({self.min_tokens}) exceeds max_tokens ({self.max_tokens})"
            )
        return self

    @property
    def prompts(self) -> list[str | list[int]]:
        """The prompts, one per entry of a batch."""
        p = self.prompt
        return list(p) if isinstance(p, list) and p and isinstance(p[0], (str, list)) else [p]


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant"]
    content: text_field(max_length=MAX_TEXT)


class ChatRequest(_Sampling):
    """``POST /v1/chat/completions``: messages through the checkpoint's chat template."""

    messages: list[ChatMessage] = Field(min_length=1, max_length=4096)
    max_tokens: int | None = Field(None, ge=1, le=INT32_MAX)
    max_completion_tokens: int | None = Field(None, ge=1, le=INT32_MAX)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)

    @property
    def echo(self) -> bool:  # chat never echoes the prompt
        return False

    @model_validator(mode="after")
    def _checks(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs: needs logprobs: true")
        if self.min_tokens > self.budget:
            raise ValueError(f"min_tokens ({self.min_tokens}) exceeds max_tokens ({self.budget})")
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


class MegatronRequest(_Strict):
    """``PUT /api``: the fields of Megatron-LM's text generation server, with its defaults."""

    prompts: list[text_field(max_length=MAX_TEXT)] = Field(min_length=1, max_length=MAX_PROMPTS)
    tokens_to_generate: Count = 64
    temperature: float = Field(1.0, gt=0.0, le=100.0, allow_inf_nan=False)
    top_k: int = Field(0, ge=0, le=1000)
    top_p: float = Field(0.0, ge=0.0, le=1.0, allow_inf_nan=False)
    add_BOS: bool = False
    logprobs: bool = False
    random_seed: int = Field(-1, ge=-1, le=INT64_MAX)  # -1: fresh randomness
    stop_token: TokenId | None = None
    no_log: bool = False
    beam_width: int | None = Field(None, ge=1, le=INT32_MAX)
    length_penalty: float = Field(1.0, allow_inf_nan=False)
    top_p_decay: float = Field(0.0, allow_inf_nan=False)
    top_p_bound: float = Field(0.0, allow_inf_nan=False)
    stop_on_eol: bool = False
    stop_on_double_eol: bool = False
    prevent_newline_after_colon: bool = False

    _numbers = _floats("temperature", "top_p", "length_penalty", "top_p_decay", "top_p_bound")

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

    model: text_field(max_length=256) | None = None
    prompt: text_field(max_length=MAX_TEXT) | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1, max_length=4096)
    add_special_tokens: bool = True  # for a prompt: as /v1/completions tokenizes it

    @model_validator(mode="after")
    def _one(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt and messages")
        return self


class DetokenizeRequest(_Strict):
    """``POST /detokenize`` (vLLM's): token ids to text."""

    model: text_field(max_length=256) | None = None
    tokens: list[TokenId] = Field(min_length=1, max_length=1 << 22)


_TAGS = {"text", "texts", "token_ids", "batch"}  # the prompt union's branches, not fields


def first_error(errors: list[dict]) -> tuple[str, str | None]:
    """(message, field) of the first of a request's validation errors (pydantic's, or
    FastAPI's whose places start at ``body``), for a one-line 400."""
    err = errors[0]
    loc = [str(p) for p in err["loc"]]
    if loc[:1] == ["body"]:
        loc = loc[1:]
    if err["type"] == "json_invalid":
        detail = (err.get("ctx") or {}).get("error", err["msg"])
        return f"the body is not valid JSON: {detail}", None
    if not loc and err["type"] in ("model_attributes_type", "dict_type", "model_type", "missing"):
        return "the body must be a JSON object of this endpoint's fields (see /openapi.json)", None
    where = ".".join(p for p in loc if p not in _TAGS) or None
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "string_unicode":
        msg = f"{where}: {NOT_UNICODE}"
    elif err["type"] == "extra_forbidden":
        msg = f"unknown field {where!r}: this server does not support it"
    elif where:
        msg = f"{where}: {msg}"
    return msg, where

"""The request schema: what one generation request may contain, checked strictly.

One definition serves every front door, so they accept and refuse alike: the ``generate`` CLI
reads it from JSONL (:func:`read_requests`), the HTTP server types its prompts with :data:`Turn`.

A request is a JSON object with an optional ``id`` and exactly one of:

- ``"prompt"``: text (needs the checkpoint's tokenizer);
- ``"token_ids"``: a list of token ids;
- ``"turns"``: a multi-turn chat, a non-empty list of turns, each text or token ids.

Types are strict: ids are JSON integers (not ``2.7``, ``"2"`` or ``true``); an ``id`` is an
integer or a string; unknown fields are refused. Nothing is coerced, so a malformed request
never becomes a plausible wrong answer.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    StrictInt,
    StrictStr,
    Tag,
    ValidationError,
    model_validator,
)

__all__ = [
    "INT32_MAX", "INT64_MAX", "INT64_MIN", "NOT_UNICODE", "GenerateRequest", "RequestError",
    "Seed", "Str", "Text", "TokenId", "TokenIds", "Turn", "check_unique_ids", "encodable",
    "read_requests", "text_field",
]  # fmt: skip


#: What a string that is not valid Unicode is told (pydantic's own words name no cause).
NOT_UNICODE = (
    "the text holds a lone UTF-16 surrogate (such as \\ud800), which is not a character: "
    "send valid Unicode"
)


def encodable(text: str) -> str:
    """``text`` if it can be written as UTF-8. JSON lets a lone surrogate such as ``\\ud800``
    through, which no tokenizer takes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = text[e.start : e.end].encode("unicode_escape").decode()
        raise ValueError(
            f"the text holds {bad} at character {e.start}, a lone UTF-16 surrogate that is "
            "not a character: send valid Unicode"
        ) from None
    return text


def text_field(*, min_length: int = 0, max_length: int | None = None) -> Any:
    """A string of valid Unicode, of bounded length (the bounds checked as a string's)."""
    return Annotated[
        StrictStr, Field(min_length=min_length, max_length=max_length), AfterValidator(encodable)
    ]


#: Any text a request holds: a string that is valid Unicode.
Str = text_field()

INT32_MAX = 2**31 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

#: A sampling seed: a 64-bit integer, as OpenAI's.
Seed = Annotated[StrictInt, Field(ge=INT64_MIN, le=INT64_MAX)]
#: Token ids fit int32 (every vocabulary does); the model's own bound is checked later.
TokenId = Annotated[StrictInt, Field(ge=0, le=INT32_MAX)]
TokenIds = Annotated[list[TokenId], Field(min_length=1)]
Text = text_field(min_length=1)


def _turn_kind(value: Any) -> str | None:
    if isinstance(value, str):
        return "text"
    if isinstance(value, list):
        return "token_ids"
    return None


#: One turn of a chat: text or token ids, told apart by type (so errors name one branch).
Turn = Annotated[
    Annotated[Text, Tag("text")] | Annotated[TokenIds, Tag("token_ids")],
    Discriminator(
        _turn_kind,
        custom_error_type="turn_type",
        custom_error_message="a turn is text or a list of token ids",
    ),
]

_SOURCES = ("prompt", "token_ids", "turns")


class RequestError(ValueError):
    """A request that does not fit the schema or the model; the message names where and what.

    Attributes:
        param: the request field at fault (``prompt``, or the token budget's name), when known.
    """

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class GenerateRequest(BaseModel):
    """One generation request.

    Attributes:
        id: the caller's name for it (echoed in outputs, the key of saved logits).
        prompt: text, tokenized with the checkpoint's tokenizer.
        token_ids: token ids.
        turns: a multi-turn chat; each turn is prefilled over the KV cache of the earlier ones.
        seed: this request's sampling seed (a 64-bit integer; default: ``--seed``). Each
            request samples from a generator of its own, so its tokens do not depend on what
            else is in the batch, and match the server's for the same seed.
    """

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    id: StrictInt | StrictStr | None = None
    prompt: Text | None = None
    token_ids: TokenIds | None = None
    turns: Annotated[list[Turn], Field(min_length=1)] | None = None
    seed: Seed | None = None

    @model_validator(mode="after")
    def _exactly_one_source(self) -> GenerateRequest:
        given = [name for name in _SOURCES if getattr(self, name) is not None]
        if len(given) != 1:
            have = f"it has {' and '.join(given)}" if given else "it has none"
            raise ValueError(f'a request has exactly one of "prompt", "token_ids", "turns"; {have}')
        return self

    @property
    def turn_list(self) -> list[str | list[int]]:
        """The request as turns (one for ``prompt`` / ``token_ids``)."""
        if self.turns is not None:
            return list(self.turns)
        return [self.prompt if self.prompt is not None else self.token_ids]

    @property
    def is_chat(self) -> bool:
        return self.turns is not None


def _where(loc: Sequence[Any]) -> str:
    """``("turns", 0, "token_ids", 2)`` -> ``turns[0][2]`` (union tags dropped)."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part not in ("text", "token_ids") or not out.startswith("turns"):
            out += f".{part}" if out else str(part)
    return out


def _got(value: Any) -> str:
    return f"got {json.dumps(value)[:40]} ({type(value).__name__})"


def _describe(error: dict) -> str:
    if error["loc"][:1] == ("id",):  # one message for the int | str union
        return f"id: must be an integer or a string, {_got(error['input'])}"
    where = _where(error["loc"])
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "string_unicode":
        message = NOT_UNICODE
    elif error["type"] in ("int_type", "string_type", "list_type", "turn_type"):
        message += f", {_got(error['input'])}"
    elif error["type"] == "extra_forbidden":
        fields = ", ".join(f'"{name}"' for name in ("id", *_SOURCES, "seed"))
        message = f"unknown field; a request has {fields}"
    return f"{where}: {message}" if where else message


def parse_request(obj: Any, *, where: str) -> GenerateRequest:
    """Validate one decoded JSON value; RequestError naming ``where``, the id and the field."""
    if not isinstance(obj, dict):
        raise RequestError(
            f"{where}: a request is a JSON object such as "
            f'{{"id": "a", "token_ids": [1, 2, 3]}}, {_got(obj)}'
        )
    try:
        return GenerateRequest.model_validate(obj)
    except ValidationError as e:
        rid = obj.get("id")
        name = f" (id {rid!r})" if type(rid) in (int, str) else ""
        details = "; ".join(dict.fromkeys(_describe(err) for err in e.errors()))
        raise RequestError(f"{where}{name}: {details}") from None


def check_unique_ids(ids: Sequence[int | str], where: Sequence[str]) -> None:
    """Ids must be distinct as outputs key them: ``1`` and ``"1"`` are the same key."""
    seen: dict[str, int] = {}
    for i, rid in enumerate(ids):
        key = str(rid)
        if key in seen:
            j = seen[key]
            raise RequestError(
                f"{where[i]}: id {rid!r} is already used by {where[j]} (id {ids[j]!r}); "
                "outputs and saved logits are keyed by the id as text, give every request "
                "its own id"
            )
        seen[key] = i


def read_requests(path: Path) -> tuple[list[int | str], list[GenerateRequest]]:
    """Read a JSONL file of requests: (ids, requests), blank lines skipped.

    A request without an ``id`` gets its position among the requests (0, 1, ...).

    Raises:
        RequestError: the file is missing, or a line is not JSON or does not fit the schema;
            the message names the file, the line, the id and the field.
    """
    path = Path(path)
    if not path.is_file():
        raise RequestError(f"--input {path} does not exist or is not a file")
    ids: list[int | str] = []
    requests: list[GenerateRequest] = []
    where: list[str] = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        here = f"{path}:{n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise RequestError(f"{here}: not valid JSON ({e})") from None
        request = parse_request(obj, where=here)
        ids.append(request.id if request.id is not None else len(requests))
        requests.append(request)
        where.append(here)
    if not requests:
        raise RequestError(f"--input {path} holds no requests; write one JSON object per line")
    check_unique_ids(ids, where)
    return ids, requests

"""``generate --chat`` and ``--stream``: chats through the checkpoint's template, answers printed
as their tokens come.

A chat's turns run one after the other over the same engine, so each turn after the first is
only what the chat template adds after the assistant's answer (the end of that turn, the next
user message, the assistant's header): its history, answer included, is already cached and is
never recomputed (persistent-KV prefill). :func:`chat_turns` renders those pieces once, before
any weight is loaded, with a placeholder where each answer will be.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import TextIO

from cp_infer.serving.text import TextStream

__all__ = ["StreamPrinter", "chat_turns"]

# stands for an answer while the template renders; no tokenizer has it as a token
_ANSWER = "\x00answer\x00"


def chat_turns(tokenizer, questions: Sequence[str]) -> list[list[int]]:
    """Token ids of each turn of a chat whose user messages are ``questions``.

    Args:
        tokenizer: a transformers tokenizer with a chat template.
        questions: the user's messages, one per turn.

    Returns:
        per turn, the ids to prefill: the whole rendering up to the assistant's header for the
        first; for each later one, what the template writes after the previous answer (whose
        end-of-turn token the answer itself ended with, when it hit EOS).

    Raises:
        ValueError: the tokenizer has no chat template, or the template renders an earlier
            turn differently once a later one follows (so the cached history would not be a
            prefix of the chat).
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "--chat needs a checkpoint whose tokenizer has a chat template; drop --chat to "
            "send the prompts as they are"
        )
    eos = tokenizer.eos_token or ""
    messages: list[dict] = []
    turns = []
    for k, question in enumerate(questions):
        messages.append({"role": "user", "content": question})
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if k:
            at = text.find(_ANSWER)
            if at < 0 or text.count(_ANSWER) != k:
                raise ValueError(
                    "--chat: the chat template drops earlier answers from later turns, so a "
                    "chat's cached history is not its prefix; send one turn per request"
                )
            text = text[text.rfind(_ANSWER) + len(_ANSWER) :]
            text = text.removeprefix(eos)  # the answer's own EOS token wrote it
        turns.append(list(tokenizer.encode(text, add_special_tokens=k == 0)))
        messages.append({"role": "assistant", "content": _ANSWER})
    return turns


class StreamPrinter:
    """Prints a batch's answers as text while they are generated, one answer at a time.

    The batch decodes together, so tokens of every answer come each step; the first
    unfinished answer (in input order) is printed as its tokens come, the others are kept
    and printed when their turn comes.

    Args:
        decode: token ids to text (special tokens skipped).
        names: each answer's label (its request id).
        questions: what each answer replies to, printed before it (None: nothing).
        eos_ids: tokens that end an answer.
        budget: the most tokens an answer has (then it ends).
        out: where to print.
    """

    def __init__(
        self, decode, names: Sequence[object], questions: Sequence[str | None], *,
        eos_ids: Sequence[int] = (), budget: int | None = None, out: TextIO | None = None,
    ) -> None:  # fmt: skip
        self.names, self.questions = list(names), list(questions)
        self.eos_ids, self.budget = frozenset(eos_ids), budget
        self.out = out or sys.stdout
        self.streams = [TextStream(decode) for _ in names]
        self.texts = ["" for _ in names]
        self.counts = [0 for _ in names]
        self.ended = [False for _ in names]
        self.current = -1
        self._advance()

    def _advance(self) -> None:
        self.current += 1
        if self.current < len(self.names):
            i = self.current
            q = self.questions[i]
            if q is not None:
                self.out.write(f"\n[{self.names[i]}] user: {q}\n")
            self.out.write(f"[{self.names[i]}] assistant: {self.texts[i]}")
            self.out.flush()

    def token(self, i: int, token: int) -> None:
        """Answer ``i`` got ``token``."""
        piece = self.streams[i].push(token)
        self.texts[i] += piece
        self.counts[i] += 1
        self.ended[i] = token in self.eos_ids or self.counts[i] == self.budget
        if i == self.current and piece:
            self.out.write(piece)
            self.out.flush()
        self._next_unfinished()

    def _next_unfinished(self) -> None:
        while self.current < len(self.names) and self.ended[self.current]:
            rest = self.streams[self.current].flush()
            self.texts[self.current] += rest
            self.out.write(rest + "\n")
            self._advance()
        self.out.flush()

    def finish(self) -> None:
        """Every answer is complete: print what is left, in order."""
        self.ended = [True for _ in self.names]
        self._next_unfinished()

"""An answer's text as its tokens come: decoded a piece at a time, and cut at stop strings.

Both are pure (no server, no tokenizer of their own): :class:`TextStream` takes the decode
function, :class:`StopStrings` plain text.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

__all__ = ["StopStrings", "TextStream"]


class TextStream:
    """The text of a growing list of tokens, a piece at a time, without decoding the whole list
    for every token (which costs O(n) per token, O(n^2) over a stream).

    Each new token is decoded with a few tokens before it for context (a tokenizer may drop or
    merge spaces at a sequence's start); the piece is what that adds. A piece that ends in an
    incomplete UTF-8 character (U+FFFD) waits for the tokens that complete it.

    Args:
        decode: token ids to text.
        prefix: the tokens the text follows (the prompt's last few): its first token is
            decoded after them, so it keeps the space a tokenizer drops at a text's start.
    """

    def __init__(self, decode: Callable[[list[int]], str], prefix: Sequence[int] = ()) -> None:
        self.decode = decode
        self.tokens: list[int] = list(prefix)
        self.context = 0  # tokens from here on are decoded for context
        self.emitted = len(self.tokens)  # tokens before this one have been turned into text

    def push(self, token: int) -> str:
        """Add ``token``; returns the text it completes ("" while a character is partial)."""
        self.tokens.append(token)
        before = self.decode(self.tokens[self.context : self.emitted])
        now = self.decode(self.tokens[self.context :])
        if len(now) <= len(before) or now.endswith("\ufffd"):
            return ""
        self.context, self.emitted = self.emitted, len(self.tokens)
        return now[len(before) :]

    def flush(self) -> str:
        """What the last tokens left pending (a partial character at the end of the stream)."""
        before = self.decode(self.tokens[self.context : self.emitted])
        now = self.decode(self.tokens[self.context :])
        self.context = self.emitted = len(self.tokens)
        return now[len(before) :]


class StopStrings:
    """Cuts a growing text before the first of some stop strings.

    Text comes a piece at a time (:meth:`push`); what it returns is safe to send: it holds back
    an end that could be the start of a stop string until the next pieces decide.

    Args:
        stops: the strings, none empty.
    """

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops, self.longest = stops, max(len(x) for x in stops)
        self.text, self.sent, self.stopped = "", 0, False

    def push(self, piece: str) -> str:
        """Add ``piece``; returns the text now safe to send ("" once stopped)."""
        if self.stopped:
            return ""
        start = max(len(self.text) - self.longest + 1, 0)  # a match ends in the new piece
        self.text += piece
        hits = [i for x in self.stops if (i := self.text.find(x, start)) >= 0]
        if hits:
            end, self.stopped = min(hits), True
        else:
            end = len(self.text) - self._held()
        out, self.sent = self.text[self.sent : end], max(self.sent, end)
        return out

    def flush(self) -> str:
        """The text held back, at the end of a stream that met no stop string."""
        out, self.sent = ("" if self.stopped else self.text[self.sent :]), len(self.text)
        return out

    def _held(self) -> int:
        """Length of the longest end of the text that begins a stop string."""
        for n in range(min(self.longest - 1, len(self.text)), 0, -1):
            tail = self.text[-n:]
            if any(x.startswith(tail) for x in self.stops):
                return n
        return 0

"""KV connectors: how an engine gets the K/V of prompts another engine prefilled.

The engine core decides *where* a prompt prefills (here, or elsewhere when a connector is
attached and the prompt is long enough); the connector moves the K/V. The core hands it a
:class:`PrefillJob`, later asks which jobs are back, and takes each one's first token and staged
K/V, which it adopts into its cache (:meth:`~cp_infer.engine.core.EngineCore.adopt`). The core
knows nothing of the transport: disaggregated serving's connector (the prefill tier over a
process group, :class:`cp_infer.serving.disagg.RemotePrefill`) lives with the server, and the
engine never imports it.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any

from cp_infer.engine.sampling import SamplingConfig

__all__ = ["KVConnector", "PrefillJob"]


@dataclass(frozen=True)
class PrefillJob:
    """A prompt for another engine to prefill: its tokens, sampling (for the first token), and
    how many leading tokens this engine's cache holds already (not sent back). ``generated``:
    how many of the last tokens the request generated already (a request resumed after a
    restart): their draws are spent, and its budget and ``min_tokens`` count them."""

    rid: int
    tokens: tuple[int, ...]
    sampling: SamplingConfig
    skip: int
    generated: int = 0


class KVConnector(abc.ABC):
    """Every rank of the engine holds one; the same calls in the same order on every rank.

    Attributes:
        min_tokens: prompts with at least this many new tokens go through the connector.
        token_heads: (token, KV head, layer) triples received so far on this rank.
    """

    min_tokens: int = 1
    token_heads: int = 0

    @abc.abstractmethod
    def fits(self, tokens: int) -> bool:
        """Whether the other engine can prefill a prompt of ``tokens`` at all."""

    @abc.abstractmethod
    def submit(self, job: PrefillJob) -> None:
        """Send ``job`` out (the leading rank) and expect its K/V (every rank)."""

    @abc.abstractmethod
    def arrived(self) -> list[int]:
        """The jobs whose first token and K/V are here, in order of arrival."""

    @abc.abstractmethod
    def take(self, rid: int) -> tuple[int, Any, str | None]:
        """Job ``rid``'s (first token, staged K/V, error), once here (waits for it)."""

    def close(self) -> None:  # noqa: B027 (optional: most connectors hold nothing to stop)
        """Stop sending jobs (the leading rank, when the engine stops)."""

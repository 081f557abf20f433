"""The step plan: everything the leader decided for one iteration, which every rank executes.

The engine group's rank 0 leads (:class:`~cp_infer.engine.core.EngineCore`): it alone admits,
matches prefixes, evicts, preempts, sizes chunks, chooses the ring variant and routes prompts to
a prefill tier. Each iteration it sends one frozen :class:`StepPlan`; every rank, the leader
included, executes it (:class:`~cp_infer.engine.worker.Worker`) and the followers keep no
scheduler. A plan carries:

- ``ops``: the changes to the KV cache's books since the last plan, in the order the leader
  made them (:data:`KVOp`): blocks freed, prefixes forked (with each rank's tail copy), prompts
  sent to or adopted from a prefill tier, a generator's skipped draw, requests forgotten. A
  follower's ledgers replay them, so they stay the leader's, block for block.
- ``sampling``: the sampling parameters of requests the workers have not seen (once each).
- the forward passes: a decode batch, a prefill batch, or both (fused into one pass or not),
  as :class:`~cp_infer.engine.batch.StepBatch` es: the slots, positions and variant follow
  from them and the books;
- per pass, the rows whose next token is drawn (:class:`Draws`): the requests, how many
  tokens each generated so far, and which log-probabilities to share;
- the rows placed on single CP ranks (:class:`PlacedPass`): each rank runs its own, and the
  others only keep their books.

Requests that continue cost only their row in a batch: their sampling parameters and
generators stay with the workers.
"""

from __future__ import annotations

from dataclasses import dataclass

from cp_infer.engine.batch import StepBatch
from cp_infer.engine.params import SamplingConfig

__all__ = ["Control", "Draws", "KVOp", "PlacedPass", "StepPlan"]

#: One change to the KV cache's books, as the leader made it:
#:
#: - ``("free", seq)``: the sequence's blocks go back (evicted, preempted, cancelled, ...);
#: - ``("fork", src, dst, position, copies)``: ``dst`` starts with ``src``'s tokens below
#:   ``position``; ``copies`` is each CP rank's (source slot, destination slot, tokens) of a
#:   partly shared block, or None;
#: - ``("remote", job)``: a prompt goes to the prefill tier (every rank expects its K/V);
#: - ``("adopt", rid, seq, skip, length)``: its K/V, back, become sequence ``seq``;
#: - ``("drop", rid)``: its K/V, back, are not kept (the request failed or was cancelled);
#: - ``("reshard", src, dst, n, rank)``: ``dst`` starts with ``src``'s first ``n`` tokens,
#:   which lie on CP rank ``rank`` alone, spread over the CP ranks as a prefill of them would
#:   leave them (``rank`` sends each its K/V): a chat moving onto the ring;
#: - ``("draw", rid, n)``: ``n`` draws of the request's generator were spent elsewhere (the
#:   prefill tier sampled its first token; an engine that restarted had sampled its first
#:   ``n``);
#: - ``("forget", rid)``: the request ended: its generator goes.
KVOp = tuple


@dataclass(frozen=True)
class Draws:
    """The rows of one pass whose next token is drawn, and what is shared of them.

    Attributes:
        rows: their rows in the pass's batch.
        rids: their requests.
        generated: tokens each has generated before (``min_tokens`` counts them).
        tops: how many alternatives each asked for (None: no log-probabilities).
        logprobs: share the drawn tokens' log-probabilities (some row asked).
        top: share this many alternatives (the most any row asked for).
        keep_logits: requests whose logits the last stage keeps (their first generated
            position: ``Request.first_logits``).
    """

    rows: tuple[int, ...]
    rids: tuple[int, ...]
    generated: tuple[int, ...]
    tops: tuple[int | None, ...]
    logprobs: bool = False
    top: int = 0
    keep_logits: frozenset[int] = frozenset()


@dataclass(frozen=True)
class PlacedPass:
    """The rows of one iteration placed on one CP rank (each request's KV wholly there): its
    decodes and prefill chunks, run by that rank alone as one pass (the other ranks only keep
    its books), with local attention and no CP collective.

    Attributes:
        rank: the CP rank that runs it.
        decode, decode_draws: its decode batch (placed on ``rank``) and rows' draws, or None.
        prefill, prefill_draws: its prefill batch (placed on ``rank``) and the rows whose prompt
            it finishes, or None.
        prompt_logprobs, prompt_top: as :class:`StepPlan`'s, for its prefill.
    """

    rank: int
    decode: StepBatch | None = None
    decode_draws: Draws | None = None
    prefill: StepBatch | None = None
    prefill_draws: Draws | None = None
    prompt_logprobs: bool = False
    prompt_top: int = 0


@dataclass(frozen=True)
class StepPlan:
    """One iteration, as every rank executes it (picklable; see the module docstring).

    Attributes:
        n: the plan's number (from 1, per engine).
        ops: changes to the books since the last plan (:data:`KVOp`).
        sampling: (rid, sampling) of the requests announced since the last plan.
        decode: the decode pass (one token per running sequence), or None.
        decode_draws: its rows' draws.
        prefill: the prefill pass (chunks of waiting prompts), or None.
        prefill_draws: the rows whose prompt it finishes (None: it finishes none).
        fused: both passes run as one (``ModelRunner.step_mixed``).
        placed: the rows placed on single CP ranks (one :class:`PlacedPass` per rank that has
            any), run after the ring's passes.
        prompt_logprobs: the prefill also returns its prompt tokens' log-probabilities, with
            ``prompt_top`` alternatives each.
        progress: a per-layer progress bar on a long prefill.
        contain: a request's sampling failure ends that request alone (serving); False, it
            ends the run (offline).
        agreed: the number of an earlier plan whose failure the leader agreed to (every rank
            failed it alike): a follower that failed it goes on; one that failed another
            stops.
    """

    n: int
    ops: tuple[KVOp, ...] = ()
    sampling: tuple[tuple[int, SamplingConfig], ...] = ()
    decode: StepBatch | None = None
    decode_draws: Draws | None = None
    prefill: StepBatch | None = None
    prefill_draws: Draws | None = None
    fused: bool = False
    placed: tuple[PlacedPass, ...] = ()
    prompt_logprobs: bool = False
    prompt_top: int = 0
    progress: bool = False
    contain: bool = True
    agreed: int | None = None

    @property
    def passes(self) -> int:
        """Forward passes it runs."""
        n = (self.decode is not None) + (self.prefill is not None)
        return (1 if self.fused else n) + bool(self.placed)


@dataclass(frozen=True)
class Control:
    """A message from the leader that is not a plan.

    Attributes:
        kind: ``"idle"`` (a heartbeat: nothing to run), ``"stop"`` (the run is over: followers
            return ``payload``) or ``"error"`` (the leader failed outside a pass: followers
            raise with ``payload``, its message).
    """

    kind: str
    payload: object = None

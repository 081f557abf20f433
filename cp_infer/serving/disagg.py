"""Disaggregated serving: a prefill tier beside the decode tier that serves the API.

The decode tier is the server (its rank 0 runs the API process and leads its engine, as a
colocated server does). A request whose new tokens number at least ``--disagg-min-tokens`` is
not prefilled there: its engine core hands it to the prefill tier (:meth:`EngineCore.
_admit_waiting`), and takes it back once its K/V and first token arrived. Shorter ones prefill
on the decode tier, as vLLM's and Dynamo's conditional disaggregation route them::

    decode rank 0 (Dispatcher)  --job: tokens, sampling, skip-->  prefill tier rank 0 -> its tier
    prefill tier (prefill_worker): prefill, first token, then K/V   (cp_infer.engine.handoff)
    every decode rank (RemotePrefill, a receiver thread)  <--first token, K/V, resharded
    decode rank 0's orders: "arrived: rids"  -> every decode rank adopts them, they decode

Every decode rank decides alike which requests go (the books are the same everywhere), so each
posts its receives in the same order as the prefill tier sends. The prefill tier takes one job
at a time; the decode tier decodes while it works. The decode tier pins the cached prefix a job
skips until the job is back, so the skipped positions are still there.

Offline, :func:`generate_disaggregated` drives the same two tiers from a list of requests
(``generate --prefill ... --decode ...``).
"""

from __future__ import annotations

import logging
import pickle
import queue
import threading
import time
from dataclasses import replace

import torch
import torch.distributed as dist

from cp_infer.engine.connector import KVConnector, PrefillJob
from cp_infer.engine.core import EngineCore, Request
from cp_infer.engine.handoff import KVSender, StagedKV, stage_kv
from cp_infer.engine.sampling import SamplingConfig
from cp_infer.engine.sizing import blocks_for_tokens
from parallel_state.tiers import TierGroups

__all__ = [
    "Dispatcher", "RemotePrefill", "generate_disaggregated", "join_decode_tier",
    "prefill_worker",
]  # fmt: skip

logger = logging.getLogger(__name__)

_JOB_TAG, _FIRST_TAG = 1, 2  # K/V travel with tag 0


def _send_object(group, obj, dst: int, tag: int = _JOB_TAG) -> None:
    data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
    group.send([torch.tensor([data.numel()], dtype=torch.int64)], dst, tag).wait()
    group.send([data], dst, tag).wait()


def _recv_object(group, src: int, tag: int = _JOB_TAG):
    n = torch.zeros(1, dtype=torch.int64)
    group.recv([n], src, tag).wait()
    data = torch.empty(int(n), dtype=torch.uint8)
    group.recv([data], src, tag).wait()
    return pickle.loads(data.numpy().tobytes())


class Dispatcher:
    """Decode tier rank 0: sends jobs to the prefill tier from a thread of its own, and a
    heartbeat while there are none (the prefill tier never waits as long as its timeout)."""

    def __init__(self, tiers: TierGroups, *, idle_s: float = 2.0) -> None:
        self.tiers, self.idle_s = tiers, idle_s
        self._jobs: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="dispatch", daemon=True)
        self._thread.start()

    def __call__(self, job: PrefillJob) -> None:
        self._jobs.put(("job", job))

    def stop(self) -> None:
        self._jobs.put(("stop", None))
        self._thread.join(timeout=30)

    def _run(self) -> None:
        dst = self.tiers.prefill.first
        while True:
            try:
                message = self._jobs.get(timeout=self.idle_s)
            except queue.Empty:
                message = ("idle", None)
            try:
                _send_object(self.tiers.handoff, message, dst)
            except RuntimeError as e:  # the prefill tier is gone (stopping, or dead): the
                # receivers fail the jobs away there; nothing more can be sent
                logger.warning("the prefill tier is unreachable: %s", str(e).split(". ")[0])
                return
            if message[0] == "stop":
                return


class RemotePrefill(KVConnector):
    """The decode tier's connector, every decode rank: receives what the prefill tier sends for
    each job (its K/V into staging, :func:`~cp_infer.engine.handoff.stage_kv`, then its first
    token, or why it failed), in a thread. First, once, the size of the prefill tier's pool
    (:meth:`fits`). On the leading rank, its :class:`Dispatcher` sends the jobs."""

    def __init__(
        self, engine: EngineCore, tiers: TierGroups, *, min_tokens: int,
        dispatcher: Dispatcher | None = None,
    ) -> None:  # fmt: skip
        self.engine, self.tiers = engine, tiers
        self.min_tokens, self.dispatcher = min_tokens, dispatcher
        self.pool = _recv_object(tiers.handoff, tiers.prefill.first, _FIRST_TAG)
        self._jobs: queue.Queue = queue.Queue()
        self._done: dict[int, tuple[int, StagedKV | None, str | None]] = {}
        self._order: list[int] = []  # finished, in arrival order
        self._ready: dict[int, threading.Event] = {}
        self._lock = threading.Lock()
        self.token_heads = 0  # received, all jobs
        threading.Thread(target=self._run, name="handoff", daemon=True).start()

    def fits(self, tokens: int) -> bool:
        """Whether the prefill tier's pool holds a prompt of ``tokens`` (with every sequence it
        keeps evicted); one it cannot hold prefills on the decode tier."""
        return blocks_for_tokens(tokens, self.pool["cp"], self.pool["block_size"]) <= self.pool[
            "blocks"]  # fmt: skip

    def submit(self, job: PrefillJob) -> None:
        self._ready[job.rid] = threading.Event()
        self._jobs.put(job)
        if self.dispatcher is not None:
            self.dispatcher(job)

    def close(self) -> None:
        if self.dispatcher is not None:
            self.dispatcher.stop()  # the prefill tier stops too

    def arrived(self) -> list[int]:
        """The jobs whose first token and K/V are here, in order."""
        with self._lock:
            return list(self._order)

    def take(self, rid: int) -> tuple[int, StagedKV | None, str | None]:
        """Job ``rid``'s (first token, staged K/V, error), once here (waits for it)."""
        self._ready[rid].wait()
        del self._ready[rid]
        with self._lock:
            self._order.remove(rid)
            return self._done.pop(rid)

    def _run(self) -> None:
        engine, tiers = self.engine, self.tiers
        while True:
            job: PrefillJob = self._jobs.get()
            first = torch.zeros(1, dtype=torch.int64)
            staged, error = None, None
            try:  # the K/V stream in while the prefill tier computes; then its first token
                try:
                    staged = stage_kv(engine, length=len(job.tokens), skip=job.skip,
                                      tiers=tiers)  # fmt: skip
                except RuntimeError as e:  # nothing came (a failed prefill): no data follows
                    staged, error = None, str(e)
                tiers.handoff.recv([first], tiers.prefill.first, _FIRST_TAG).wait()
                if int(first) < 0:
                    why = _recv_object(tiers.handoff, tiers.prefill.first, _FIRST_TAG)
                    staged, error = None, f"the prefill tier failed: {why}"
                elif staged is not None:
                    self.token_heads += staged.stats.token_heads
            except Exception as e:  # the prefill tier is gone: every job fails
                staged, error = None, f"the hand-off failed: {e}"
                first[0] = -1
            with self._lock:
                self._done[job.rid] = (int(first), staged, error)
                self._order.append(job.rid)
            self._ready[job.rid].set()


def prefill_worker(engine: EngineCore, tiers: TierGroups) -> None:
    """The prefill tier, every rank: take jobs from the decode tier until it says stop; prefill
    each (its own cache shares what earlier ones left), sample the first token, and hand the
    K/V to the decode tier. A job runs as a server's request does (:meth:`EngineCore.run`,
    contained): one that fails, fails alone, and the decode ranks learn why."""
    group = tiers.handoff
    pool = engine.cache.pool
    if tiers.rank == tiers.prefill.first:  # what the decode tier routes by
        for r in range(tiers.decode.size):
            _send_object(group, {"blocks": pool.n_blocks, "block_size": pool.block_size,
                                 "cp": pool.cp}, tiers.decode.world_rank(r), _FIRST_TAG)  # fmt: skip
    jobs = handed = 0
    while True:
        box = [None]
        if tiers.rank == tiers.prefill.first:
            box[0] = _recv_object(group, tiers.decode.first)
        if tiers.prefill.size > 1:
            dist.broadcast_object_list(box, src=0)  # the tier's own group
        kind, job = box[0]
        if kind == "stop":
            logger.info("prefill tier: %d prompts prefilled; this rank sent %d (token, KV head, "
                        "layer) triples of them", jobs, handed)  # fmt: skip
            return
        if kind != "job":
            continue
        # the first token alone: a request's min_tokens reaches past it (the decode tier
        # counts it on), but keeps EOS from being that token. A resumed request's tokens so
        # far count too (its draws spent, its budget and min_tokens counting them)
        n = job.generated
        first_only = replace(job.sampling, max_new_tokens=n + 1,
                             min_tokens=min(job.sampling.min_tokens, n + 1))  # fmt: skip
        cut = len(job.tokens) - n
        request = Request(job.rid, job.tokens[:cut], first_only, generated=job.tokens[cut:])
        sender = KVSender(engine, tiers=tiers, length=len(job.tokens), skip=job.skip)

        def after_layer(batch, layer: int, sender=sender) -> None:  # stream as it computes
            if sender.seq is None:
                sender.start(batch.seqs[0], staged=True)  # the job's: the only one running
            elif batch.seqs[0] != sender.seq:
                raise RuntimeError("the prompt did not prefill in one pass (the prefill tier's "
                                   "KV pool is too small): raise its --kv-cache-memory")  # fmt: skip
            sender.layer(layer)

        # every rank alike (its rank 0 leads): a failure is agreed, and ends this job alone
        (outcome,), _ = engine.run([request], contain=True, after_layer=after_layer)
        if outcome.error is None:
            first = outcome.tokens[-1]
        else:
            logger.warning("request %d: prefill failed: %s", job.rid, outcome.error)
            first = -1
            sender.abort()
        handed += sender.finish().token_heads
        if tiers.rank == tiers.prefill.first:
            for r in range(tiers.decode.size):
                dst = tiers.decode.world_rank(r)
                group.send([torch.tensor([first])], dst, _FIRST_TAG).wait()
                if first < 0:
                    _send_object(group, outcome.error, dst, _FIRST_TAG)
        jobs += 1


def join_decode_tier(
    engine: EngineCore, tiers: TierGroups, *, min_tokens: int, lead: bool
) -> RemotePrefill | None:  # fmt: skip
    """Make ``engine`` (a decode tier rank's) hand prompts of ``min_tokens`` new tokens or more
    to the prefill tier: its connector, which on the leading rank (``lead``) also sends the jobs
    (close it to stop the prefill tier). Returns the connector on the leading rank."""
    dispatcher = Dispatcher(tiers) if lead else None
    connector = RemotePrefill(engine, tiers, min_tokens=min_tokens, dispatcher=dispatcher)
    engine.connect(connector)
    return connector if lead else None


def generate_disaggregated(
    engine: EngineCore, tiers: TierGroups, chats: list[list[list[int]]],
    sampling: SamplingConfig, *, seeds: list[int], min_tokens: int,
) -> list[list[list[int]]] | None:  # fmt: skip
    """Offline generation over the two tiers, driven as the server drives them: the same
    prefill worker, routing, streamed hand-off and :class:`~cp_infer.serving.loop.ServeLoop`,
    with the requests from a list instead of the API (call on every rank of both tiers, each
    with its own tier's engine).

    Args:
        chats: per conversation, its turns' new tokens (one turn: plain prompts); turn ``k``
            of a chat starts once turn ``k - 1`` of every chat is done, its history before it.
        seeds: each conversation's sampling seed.
        min_tokens: ``--disagg-min-tokens``: shorter new tokens prefill on the decode tier.

    Returns:
        On decode tier rank 0 (which leads), per turn, each conversation's generated tokens;
        None on every other rank.

    Raises:
        RuntimeError: a request failed (decode tier rank 0, once both tiers stopped).
    """
    from cp_infer.serving.loop import ServeLoop

    if tiers.tier is tiers.prefill:
        prefill_worker(engine, tiers)
        return None
    connector = join_decode_tier(engine, tiers, min_tokens=min_tokens, lead=dist.get_rank() == 0)
    loop = ServeLoop(engine)
    if connector is None:
        loop.follow()
        return None
    n, turns = len(chats), len(chats[0])
    history: list[list[int]] = [[] for _ in chats]
    results: list[list[list[int]]] = []  # per finished turn, each chat's tokens
    outcomes: dict = {}  # the running turn's, by request id
    failed: list[str] = []

    def ask(turn: int, i: int) -> Request:
        """Chat ``i``'s request for ``turn``: its history, then the turn's new tokens."""
        if turn:
            history[i] += [*chats[i][turn - 1], *results[turn - 1][i]]
        return Request(turn * n + i, tuple(history[i] + chats[i][turn]),
                       replace(sampling, seed=seeds[i]))  # fmt: skip

    pending = [ask(0, i) for i in range(n)]

    def next_requests(wait_s: float, limit: int) -> list[Request] | None:
        if not pending and len(outcomes) == n:  # the turn is done: the next one, or stop
            finished = [outcomes[len(results) * n + i] for i in range(n)]
            results.append([o.tokens for o in finished])
            failed.extend(o.error for o in finished if o.error is not None)
            if failed or len(results) == turns:
                return None
            outcomes.clear()
            pending.extend(ask(len(results), i) for i in range(n))
        if not pending:
            time.sleep(wait_s)
        take = pending[: max(limit, 0)]
        del pending[: len(take)]
        return take

    try:
        loop.lead(next_requests, emit=lambda _: None, cancelled=set,
                  done=lambda _, res: outcomes.update(res))  # fmt: skip
    finally:
        connector.close()  # the prefill tier stops too
    if failed:
        raise RuntimeError(f"a request failed: {failed[0]}")
    return results

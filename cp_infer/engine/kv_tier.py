"""A second tier for the KV cache: sequences the pool evicts go to files, and come back from
them at any layout, in a fraction of a prefill.

The pool (:mod:`cp_infer.engine.kv_pool`) keeps finished sequences for reuse until it needs
their blocks. With a tier, an evicted sequence is *spilled* first: every rank writes what it
holds of it, and a later request that starts with those tokens reads them back instead of
prefilling them again (a chat whose history was evicted while its user typed).

Layout-free. An entry is one directory: a ``manifest.json`` (the tokens, the model's
fingerprint, the shard files) and one safetensors shard per writing rank
(:mod:`cp_infer.engine.tier_files`). A shard records *what* it holds, not whose it was: its
layers, its global KV heads, and the position of every token. So a reader of any layout
takes, from every shard that overlaps it, the layers of its pipeline stage, the heads of its TP
rank and the positions its CP rank would keep after a prefill
(:func:`~cp_infer.sharding.span_positions`): an entry written by ``--cp 2`` is read by ``--cp
1``, ``--tp 2 --cp 2`` or ``--cp 2 --pp 2`` alike, and every token of every head of every layer
must arrive exactly once or the entry is not used. A head replicated over TP ranks is written
by the first of them only. An FP8 cache writes its bytes and scales as they are.

Who does what. The engine's leader keeps the tier's index (:class:`TierIndex`: which entries
exist, their tokens, least recently used first, within a byte budget); every rank holds a
:class:`TierIO` that writes and reads its own shards in background threads, so a spill costs
the step one copy of the sequence's K/V into host memory, and a read overlaps other requests'
steps. An entry is found only once every shard it lists exists (each is renamed into place
whole), and every file is checked (its CRC-32s, its fingerprint, its entry) as it is read: a
corrupt, cut-short or foreign shard makes every rank skip the entry (they agree by an
all-reduce before any stores it) and the prefix is prefilled as if it were not there.

A host-memory tier is the same thing in a tmpfs directory (``/dev/shm``), and a server started
on a directory that holds entries of its model uses them (a warm start; the fingerprint keeps
another model's, dtype's or KV dtype's apart).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cp_infer.distributed import RankFailure, on_all_ranks
from cp_infer.engine.handoff import HandoffStats, StagedKV
from cp_infer.engine.kv_cache import KVCache
from cp_infer.engine.kv_manager import PrefixIndex
from cp_infer.engine.tier_files import FORMAT_VERSION, ShardFile, TierFileError, write_file
from cp_infer.models.config import ModelConfig
from cp_infer.parallel.parallelize import kv_head_range
from cp_infer.reporting import atomic_write
from cp_infer.sharding import span_positions

__all__ = [
    "HOST_TIER_ROOT", "UNWRITTEN_S", "TierEntry", "TierIO", "TierIndex", "TierStats", "entry_key",
    "model_fingerprint", "resolve_tier_path", "shard_name",
]  # fmt: skip

logger = logging.getLogger(__name__)

#: where ``--kv-tier host`` keeps its files: host memory (tmpfs)
HOST_TIER_ROOT = Path("/dev/shm")
MANIFEST = "manifest.json"
#: an entry some shard of which is still missing this long after its spill is dropped (a rank
#: could not write it: a full disk, say)
UNWRITTEN_S = 60.0


def model_fingerprint(
    cfg: ModelConfig, *, dtype: torch.dtype, kv_dtype: str, weights: str,
    fp8_layers: Sequence[str] = (),
) -> str:  # fmt: skip
    """What makes two engines' K/V interchangeable: the model's config, the weights' identity
    (``weights``: see :func:`cp_infer.entrypoints.bootstrap.weights_identity`), the compute
    dtype, the KV dtype and the layers that run in FP8. Not the layout."""
    doc = {"config": repr(cfg), "dtype": str(dtype), "kv_dtype": kv_dtype,
           "weights": weights, "fp8_layers": sorted(fp8_layers)}  # fmt: skip
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def entry_key(tokens: Sequence[int]) -> str:
    """An entry's name: a hash of its tokens."""
    return hashlib.sha256(torch.tensor(list(tokens), dtype=torch.int64).numpy().tobytes()
                          ).hexdigest()[:32]  # fmt: skip


def shard_name(tp_rank: int, cp_rank: int, pp_rank: int) -> str:
    return f"shard-tp{tp_rank}-cp{cp_rank}-pp{pp_rank}.safetensors"


def owned_heads(cfg: ModelConfig, tp: int, tp_rank: int) -> range:
    """The global KV heads TP rank ``tp_rank`` writes: those it holds and no lower TP rank
    holds (a head replicated over TP ranks is written once)."""
    start, stop = kv_head_range(cfg, tp, tp_rank)
    below = max((kv_head_range(cfg, tp, r)[1] for r in range(tp_rank)), default=0)
    return range(max(start, below), stop)


def resolve_tier_path(spec: str) -> Path:
    """``--kv-tier``'s directory: ``host`` is host memory (a tmpfs directory), anything else a
    path."""
    if spec == "host":
        return HOST_TIER_ROOT / f"cp_infer-kv-tier-{os.getuid()}"
    return Path(spec)


@dataclass
class TierStats:
    """The tier's counts (the leader's; bytes are the whole entry's, times rank 0's).

    Attributes:
        queries: prompt tokens looked up in the tier (those the pool did not hold).
        hits: of them, tokens read back.
        load_bytes, load_s: bytes read back, and rank 0's seconds reading.
        store_bytes, store_s: bytes spilled, and rank 0's seconds writing.
        entries, nbytes: what the tier holds now.
        skipped: entries found unusable (corrupt, cut short, foreign) and dropped.
        spills_skipped: evictions not spilled (over the budget or the write buffer).
    """

    queries: int = 0
    hits: int = 0
    load_bytes: int = 0
    load_s: float = 0.0
    store_bytes: int = 0
    store_s: float = 0.0
    entries: int = 0
    nbytes: int = 0
    skipped: int = 0
    spills_skipped: int = 0


@dataclass
class TierEntry:
    """One spilled sequence, as the leader's index knows it."""

    key: str
    tokens: list[int]
    shards: tuple[str, ...]
    nbytes: int
    whole: bool = False  # every shard file is there (checked once, then trusted)
    pins: int = 0  # reads in flight
    spilled: float = field(default_factory=time.monotonic)


class TierIO:
    """This rank's reads and writes of the tier (every rank of the engine holds one).

    Args:
        root: the tier's directory for this model (the fingerprint's).
        fingerprint: the model's (:func:`model_fingerprint`).
        cfg: the model config.
        cache: this rank's KV cache.
        tp, tp_rank, cp, cp_rank, pp_rank: this rank's place in its layout.
    """

    def __init__(
        self, root: Path, *, fingerprint: str, cfg: ModelConfig, cache: KVCache, tp: int,
        tp_rank: int, cp: int, cp_rank: int, pp_rank: int,
    ) -> None:  # fmt: skip
        self.root, self.fingerprint, self.cfg, self.cache = Path(root), fingerprint, cfg, cache
        self.cp, self.cp_rank = cp, cp_rank
        self.heads = range(*kv_head_range(cfg, tp, tp_rank))
        self.owned = owned_heads(cfg, tp, tp_rank)
        self.name = shard_name(tp_rank, cp_rank, pp_rank)
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="kv-tier-write")
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="kv-tier-read")
        self._reads: dict[int, Future] = {}
        self._lock = threading.Lock()
        self.pending_bytes = 0  # captured, not yet written
        self.write_s = 0.0
        self.read_s = 0.0
        self.written = 0

    # -- writing ------------------------------------------------------------------------------
    def capture(self, seq: int, key: str) -> int:
        """Copy this rank's K/V of ``seq`` (its owned heads) into host memory and write them as
        its shard of entry ``key`` in the background. Returns the bytes held until written."""
        positions = self.cache.positions(seq)
        if not positions or not len(self.owned):
            return 0
        local = slice(self.owned.start - self.heads.start, self.owned.stop - self.heads.start)
        tensors: dict[str, torch.Tensor] = {"positions": torch.tensor(positions, dtype=torch.int64)}
        for layer in self.cache.layer_ids:
            parts = self.cache.raw(layer, seq)
            names = ("k", "v", "k_scale", "v_scale")
            for name, t in zip(names, parts, strict=False):
                t = t[local].contiguous().cpu()  # (its own memory: the heads it writes)
                tensors[f"{name}.{layer}"] = t.view(torch.uint8) if t.dtype.itemsize == 1 else t
        meta = {
            "fingerprint": self.fingerprint, "entry": key,
            "layers": f"{self.cache.layer_ids[0]},{self.cache.layer_ids[-1] + 1}",
            "heads": f"{self.owned.start},{self.owned.stop}", "kv_dtype": self.cache.kv_dtype,
        }  # fmt: skip
        nbytes = sum(t.nbytes for t in tensors.values())
        with self._lock:
            self.pending_bytes += nbytes
        self._writer.submit(self._write, self.root / key / self.name, tensors, meta, nbytes)
        return nbytes

    def _write(self, path: Path, tensors, meta, nbytes: int) -> None:
        t0 = time.perf_counter()
        try:
            if path.parent.is_dir():  # (gone: the leader dropped the entry meanwhile)
                write_file(path, tensors, meta)
                self.written += 1
        except Exception as e:  # a full disk, say: the entry is never whole, never used
            logger.warning("KV tier: could not write %s: %s", path, e)
        finally:
            with self._lock:
                self.pending_bytes -= nbytes
            self.write_s += time.perf_counter() - t0

    def drain(self) -> None:
        """Wait for the writes queued so far (tests; a clean stop)."""
        self._writer.submit(lambda: None).result()

    # -- reading ------------------------------------------------------------------------------
    def fetch(self, ticket: int, key: str, shards: Sequence[str], skip: int, length: int) -> None:
        """Start reading this rank's share of positions ``[skip, length)`` of entry ``key``."""
        self._reads[ticket] = self._reader.submit(self._read, key, tuple(shards), skip, length)

    def done(self, ticket: int) -> bool:
        return ticket in self._reads and self._reads[ticket].done()

    def take(self, ticket: int) -> tuple[StagedKV | None, str | None]:
        """Fetch ``ticket``'s result (waits for it): the staged K/V, or why it failed."""
        try:
            return self._reads.pop(ticket).result(), None
        except TierFileError as e:
            return None, str(e)

    def agree(self, ticket: int, group=None) -> str | None:
        """None when every rank of ``group`` read its share of ``ticket``, else why not (the
        first failing rank's reason, on every rank). A collective: every rank calls it, in
        the same order."""
        try:
            on_all_ranks(self._reads[ticket].result, group)
        except RankFailure as e:
            return str(e)
        return None

    def _read(self, key: str, shards: tuple[str, ...], skip: int, length: int) -> StagedKV:
        """This rank's share, staged; any failure is a :class:`TierFileError` (a file whose
        CRCs hold but whose shapes do not add up is as unusable as a corrupt one)."""
        t0 = time.perf_counter()
        try:
            staged = self._read_entry(key, shards, skip, length)
        except TierFileError:
            raise
        except Exception as e:
            raise TierFileError(f"entry {key}: {type(e).__name__}: {e}") from e
        self.read_s += time.perf_counter() - t0
        return staged

    def _read_entry(self, key: str, shards: tuple[str, ...], skip: int, length: int) -> StagedKV:
        cfg, cache = self.cfg, self.cache
        layers = list(cache.layer_ids)
        kept = torch.tensor(span_positions(skip, length, self.cp, self.cp_rank), dtype=torch.int64)
        wire = torch.uint8 if cache.fp8 else cache.dtype
        heads = self.heads
        kv = [torch.zeros(2, len(heads), kept.numel(), cfg.head_dim, dtype=wire) for _ in layers]
        scales = [torch.ones(2, len(heads), kept.numel()) for _ in layers] if cache.fp8 else None
        covered = torch.zeros(len(layers), len(heads), kept.numel(), dtype=torch.int32)
        stats = HandoffStats()
        for name in shards:
            with ShardFile(self.root / key / name, fingerprint=self.fingerprint, entry=key) as f:
                if f.meta.get("kv_dtype") != cache.kv_dtype:
                    raise TierFileError(f"{f.path}: KV dtype {f.meta.get('kv_dtype')}, this "
                                        f"cache's {cache.kv_dtype}")  # fmt: skip
                try:
                    l0, l1 = (int(x) for x in f.meta["layers"].split(","))
                    h0, h1 = (int(x) for x in f.meta["heads"].split(","))
                except (KeyError, ValueError) as e:
                    raise TierFileError(f"{f.path}: no valid layers/heads ({e})") from e
                lo, hi = max(h0, heads.start), min(h1, heads.stop)
                mine = [(li, layer) for li, layer in enumerate(layers) if l0 <= layer < l1]
                if lo >= hi or not mine:
                    continue
                pos = f.read("positions")
                if not kept.numel():
                    continue
                idx = torch.searchsorted(kept, pos).clamp(max=kept.numel() - 1)
                take = kept[idx] == pos  # (``kept`` holds only positions of [skip, length))
                src, dst = take.nonzero().squeeze(1), idx[take]
                theirs = slice(lo - h0, hi - h0)
                local = slice(lo - heads.start, hi - heads.start)
                for li, layer in mine:
                    for j, part in enumerate(("k", "v")):
                        t = f.read(f"{part}.{layer}")
                        kv[li][j, local][:, dst] = t[theirs][:, src]
                        stats.nbytes += t.nbytes
                        if scales is not None:
                            s = f.read(f"{part}_scale.{layer}")
                            scales[li][j, local][:, dst] = s[theirs][:, src]
                            stats.nbytes += s.nbytes
                    covered[li, local].index_add_(1, dst, torch.ones(hi - lo, dst.numel(),
                                                                     dtype=torch.int32))  # fmt: skip
                stats.token_heads += (hi - lo) * dst.numel() * len(mine)
        if not bool((covered == 1).all()):
            missing = int((covered == 0).sum())
            raise TierFileError(f"entry {key}: {missing} (layer, head, position) triples of "
                                "this rank's share missing or repeated")  # fmt: skip
        return StagedKV(length, skip, kv, scales, stats)

    def close(self) -> None:
        self._reader.shutdown(wait=False, cancel_futures=True)
        self._writer.shutdown(wait=True)


class TierIndex:
    """The leader's book of the tier: its entries (least recently used first), what they
    cost, and which one a prompt starts with (see the module docstring).

    Args:
        root: the tier's directory for this model.
        fingerprint: the model's.
        budget: bytes the tier may hold; the least recently used entries go past it.
        write_buffer: bytes of spilled K/V rank 0 may hold in memory before they are written;
            an eviction past it is not spilled.
        entry_bytes: bytes of an entry of ``n`` tokens, every shard (``n -> bytes``).
        shards: the shard files of a sequence (given its tokens per CP rank).
    """

    def __init__(
        self, root: Path, *, fingerprint: str, budget: int, write_buffer: int,
        entry_bytes, shards,
    ) -> None:  # fmt: skip
        self.root, self.fingerprint = Path(root), fingerprint
        self.budget, self.write_buffer = budget, write_buffer
        self.entry_bytes, self.shards = entry_bytes, shards
        self.entries: OrderedDict[str, TierEntry] = OrderedDict()
        self.stats = TierStats()
        self._ids: dict[str, int] = {}
        self._keys: dict[int, str] = {}
        self._next = 0
        self.index = PrefixIndex(64)
        self._lock_file = None

    # -- the directory ------------------------------------------------------------------------
    def open(self) -> None:
        """Take the directory (one server at a time) and index what is there (warm start)."""
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock_file = open(self.root / ".lock", "w")  # noqa: SIM115 (held while serving)
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock_file.close()
            raise RuntimeError(
                f"another server uses the KV tier {self.root.parent}: give this one a --kv-tier "
                "directory of its own"
            ) from None
        found = []
        for d in self.root.iterdir():
            if not d.is_dir():
                if d.name.startswith(".") and d.name.endswith(".tmp"):
                    d.unlink(missing_ok=True)
                continue
            entry = self._load(d)
            if entry is None:
                shutil.rmtree(d, ignore_errors=True)
                continue
            found.append(((d / MANIFEST).stat().st_mtime, entry))
        for _, entry in sorted(found, key=lambda f: f[0]):
            self._add(entry)
        self._fit(0)
        if self.entries:
            logger.info("KV tier %s: %d entries, %.1f MiB (warm start)", self.root,
                        len(self.entries), self.stats.nbytes / 2**20)  # fmt: skip

    def _load(self, d: Path) -> TierEntry | None:
        """An entry directory's manifest, if it is whole and this model's (else it goes)."""
        try:
            doc = json.loads((d / MANIFEST).read_text())
            if (
                doc.get("cp_infer_kv") != FORMAT_VERSION
                or doc.get("fingerprint") != self.fingerprint
            ):
                raise ValueError("another model's or format's")
            tokens, shards = [int(t) for t in doc["tokens"]], tuple(doc["shards"])
            if entry_key(tokens) != d.name or doc.get("entry") != d.name:
                raise ValueError("its tokens do not hash to its name")
            sizes = [(d / s).stat().st_size for s in shards]
        except (OSError, ValueError, KeyError, TypeError) as e:
            logger.warning("KV tier: skipping %s: %s", d, e)
            return None
        return TierEntry(d.name, tokens, shards, sum(sizes), whole=True)

    def close(self) -> None:
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    # -- lookups ------------------------------------------------------------------------------
    def match(self, tokens: Sequence[int]) -> tuple[TierEntry | None, int]:
        """The whole entry sharing the longest prefix with ``tokens``, and its length."""
        i, n = self.index.match(tokens)
        if i is None or not n:
            return None, 0
        entry = self.entries[self._keys[i]]
        if not entry.whole:  # its shards are still being written: not yet
            entry.whole = all((self.root / entry.key / s).exists() for s in entry.shards)
            if not entry.whole:
                if time.monotonic() - entry.spilled > UNWRITTEN_S and not entry.pins:
                    self.drop(entry, f"a rank did not write its shard within {UNWRITTEN_S:.0f}s "
                              "(see its log)")  # fmt: skip
                return None, 0
        return entry, n

    def touch(self, entry: TierEntry) -> None:
        self.entries.move_to_end(entry.key)
        with contextlib.suppress(OSError):
            os.utime(self.root / entry.key / MANIFEST)

    def pin(self, entry: TierEntry) -> None:
        entry.pins += 1

    def unpin(self, entry: TierEntry) -> None:
        entry.pins -= 1

    # -- spills -------------------------------------------------------------------------------
    def plan_spill(self, tokens: Sequence[int], rank_tokens: Sequence[int],
                   pending: int) -> TierEntry | None:  # fmt: skip
        """Decide whether an evicted sequence of ``tokens`` (``rank_tokens[r]`` of them on CP
        rank r) goes to the tier, and make room; returns its new entry (its directory and
        manifest written) or None. ``pending``: bytes rank 0 has not written yet."""
        tokens = list(tokens)
        if not tokens:
            return None
        held, n = self.match(tokens)
        key = entry_key(tokens)
        if key in self.entries or (held is not None and n == len(tokens)):  # there already
            if held is not None:
                self.touch(held)
            return None
        nbytes = self.entry_bytes(len(tokens))
        if nbytes > self.budget or pending + nbytes > self.write_buffer:
            self.stats.spills_skipped += 1
            return None
        for old in [e for e in self.entries.values()
                    if len(e.tokens) < len(tokens) and not e.pins
                    and tokens[: len(e.tokens)] == e.tokens]:  # fmt: skip
            self.drop(old)  # superseded: the new entry holds all it had (a chat's last turn)
        if not self._fit(nbytes):  # (every older entry is being read)
            self.stats.spills_skipped += 1
            return None
        entry = TierEntry(key, tokens, tuple(self.shards(rank_tokens)), nbytes)
        d = self.root / key
        try:
            d.mkdir(exist_ok=True)
            doc = {"cp_infer_kv": FORMAT_VERSION, "fingerprint": self.fingerprint, "entry": key,
                   "tokens": tokens, "shards": list(entry.shards), "created": time.time()}  # fmt: skip
            atomic_write(d / MANIFEST, lambda tmp: tmp.write_text(json.dumps(doc)))
        except OSError as e:
            logger.warning("KV tier: could not write entry %s: %s", d, e)
            shutil.rmtree(d, ignore_errors=True)
            self.stats.spills_skipped += 1
            return None
        self._add(entry)
        self.stats.store_bytes += nbytes
        return entry

    def drop(self, entry: TierEntry, why: str | None = None) -> None:
        """Forget ``entry`` and delete its files (``why``: it was found unusable)."""
        if why is not None:
            logger.warning("KV tier: entry %s (%d tokens) skipped and dropped: %s", entry.key,
                           len(entry.tokens), why)  # fmt: skip
            self.stats.skipped += 1
        if self.entries.pop(entry.key, None) is None:
            return
        i = self._ids.pop(entry.key)
        del self._keys[i]
        self.index.remove(i)
        self.stats.entries -= 1
        self.stats.nbytes -= entry.nbytes
        shutil.rmtree(self.root / entry.key, ignore_errors=True)

    def _add(self, entry: TierEntry) -> None:
        i, self._next = self._next, self._next + 1
        self._ids[entry.key], self._keys[i] = i, entry.key
        self.entries[entry.key] = entry
        self.index.add(i, entry.tokens)
        self.stats.entries += 1
        self.stats.nbytes += entry.nbytes

    def _fit(self, nbytes: int) -> bool:
        """Drop least recently used entries (not one being read) until ``nbytes`` more fit."""
        for entry in list(self.entries.values()):
            if self.stats.nbytes + nbytes <= self.budget:
                break
            if not entry.pins:
                self.drop(entry)
        return self.stats.nbytes + nbytes <= self.budget

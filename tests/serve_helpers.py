"""What the server tests share: a server under a launcher, up once it answers, and stopped so
that nothing it started outlives the test."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from cp_infer.distributed import free_port
from cp_infer.testing.processes import engine_pids, server_processes
from cp_infer.testing.tokenizer import write_word_tokenizer

REPO = Path(__file__).resolve().parents[1]


def make_checkpoint(out: Path, *, bos_id: int | None = None) -> Path:
    """tiny-llama with random weights and a word tokenizer (token i is the word ``w<i>``;
    ``bos_id``: the token its post-processor puts first)."""
    subprocess.run([sys.executable, "examples/make_tiny_checkpoint.py", "--preset", "tiny-llama",
                    "--output", str(out)], check=True, cwd=REPO, capture_output=True)  # fmt: skip
    write_word_tokenizer(out, 512, bos_id=bos_id)
    return out


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


class Server:
    """``torchrun ... -m cp_infer serve`` in its own session, up once /health answers.

    A port picked free can be taken before the server binds it (another process's ephemeral
    port): then it starts again on another, up to 3 times.
    """

    def __init__(
        self, checkpoint: Path, nproc: int, args: list[str], log: Path, *, script: str | None = None,
        deepspeed: bool = False, by_hand: bool = False, env: dict[str, str] | None = None,
    ) -> None:  # fmt: skip
        self.log, self.deepspeed = log, deepspeed
        for attempt in range(3):
            self.port = free_port()
            self.url = f"http://127.0.0.1:{self.port}"
            launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node",
                        str(nproc), "--master-port", str(free_port())]  # fmt: skip
            if deepspeed:
                launcher = [str(Path(sys.executable).with_name("deepspeed")), "--num_gpus",
                            str(nproc), "--master_port", str(free_port()), "--module"]  # fmt: skip
            if by_hand:  # one process, no launcher
                assert nproc == 1
                launcher = [sys.executable]
            target = [script] if script else ["cp_infer"] if deepspeed else ["-m", "cp_infer"]
            cmd = [*launcher, *target, "serve", "--checkpoint", str(checkpoint),
                   "--port", str(self.port), *args]  # fmt: skip
            self.proc = subprocess.Popen(
                cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=REPO,
                env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
                start_new_session=True,
            )  # fmt: skip
            if self._wait_up():
                return
            text = log.read_text()
            self.stop()
            if "address already in use" not in text or attempt == 2:
                raise RuntimeError(f"the server did not come up:\n{text[-3000:]}")

    def _wait_up(self) -> bool:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return True
            except httpx.HTTPError:  # not listening yet
                pass
            # look again soon (a test waits), not at once: a 503 "starting" comes back in a
            # millisecond, and polling flat out took CPU from the ranks loading the model
            time.sleep(0.1)
        return False

    def stop(self, sig: int = signal.SIGTERM) -> float:
        """``sig`` (SIGTERM, as a scheduler sends it); seconds until every process is gone
        (inf if some had to be killed).

        torchrun forwards it to the ranks. DeepSpeed's runner does not (it exits and leaves its
        launcher and ranks running), so there, as Ctrl-C or Slurm do, the whole process group
        gets it."""
        t0 = time.monotonic()
        if self.proc.poll() is None:
            if self.deepspeed:
                os.killpg(self.proc.pid, sig)
            else:
                self.proc.send_signal(sig)
        return self.wait_gone(t0)

    def wait_gone(self, t0: float | None = None, timeout_s: float = 60) -> float:
        """Seconds (since ``t0``) until no process of the server is left; inf, and they are
        killed, if some still are after ``timeout_s``."""
        t0 = time.monotonic() if t0 is None else t0
        while self.alive() and time.monotonic() < t0 + timeout_s:
            time.sleep(0.1)
        took = time.monotonic() - t0
        if self.alive():  # whatever is left must not outlive the test
            took = float("inf")
            if _group_alive(self.proc.pid):
                os.killpg(self.proc.pid, signal.SIGKILL)
            for pid in self.ranks() + self.engines():
                os.kill(pid, signal.SIGKILL)
        self.proc.wait()
        return took

    def post(self, path: str, body, **kw) -> httpx.Response:
        return httpx.post(self.url + path, json=body, timeout=120, **kw)

    def _processes(self) -> dict[int, tuple[int, int]]:
        return server_processes(self.port, exclude=self.proc.pid)

    def ranks(self) -> list[int]:
        """The pids of the ranks' keepers (``python -m cp_infer serve``, or the script's: the
        processes the launcher started), rank order."""
        found = self._processes()
        keepers = {rank: pid for pid, (rank, ppid) in found.items() if ppid not in found}
        return [keepers[r] for r in sorted(keepers)]

    def engines(self) -> list[int]:
        """The pids of the ranks' engines (each keeper's forked child), rank order."""
        engines = engine_pids(self.port)
        return [engines[r] for r in sorted(engines)]

    def api_process(self) -> int | None:
        """The pid of the API process rank 0 started (a child of rank 0), if it runs."""
        ranks = self.ranks()
        if not ranks:
            return None
        out = subprocess.run(["pgrep", "-P", str(ranks[0]), "-f", "multiprocessing.spawn"],
                             capture_output=True, text=True).stdout.split()  # fmt: skip
        return int(out[0]) if out else None

    def alive(self) -> bool:
        """Whether any process of the server is left (its group, or a rank in a session of
        its own)."""
        return self.proc.poll() is None or _group_alive(self.proc.pid) or bool(self._processes())


class Stream:
    """A streamed completion read in a thread: its events, and when each came."""

    def __init__(self, url: str, body: dict, path: str = "/v1/completions") -> None:
        self.events: list = []
        self.started = threading.Event()
        self.closed_at: float | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._read, args=(url + path, body), daemon=True)
        self._thread.start()

    def _read(self, url: str, body: dict) -> None:
        try:
            with httpx.stream("POST", url, json=body, timeout=60) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        data = line[6:]
                        self.events.append(data if data == "[DONE]" else json.loads(data))
                        if len(self.events) >= 5:
                            self.started.set()
        except httpx.HTTPError as e:
            self.error = e
        finally:
            self.closed_at = time.monotonic()
            self.started.set()

    def join(self, timeout: float = 60) -> Stream:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the stream did not end"
        return self

    @property
    def tokens(self) -> list[int]:
        return [t for e in self.events if isinstance(e, dict) and e.get("choices")
                for t in e["choices"][0].get("token_ids") or []]  # fmt: skip

    @property
    def logprobs(self) -> list[float]:
        """The streamed tokens' log-probabilities, when the request asked for them."""
        out = []
        for e in self.events:
            if not (isinstance(e, dict) and e.get("choices")):
                continue
            lp = e["choices"][0].get("logprobs")
            if lp:
                out += lp["token_logprobs"] if "token_logprobs" in lp else [
                    c["logprob"] for c in lp["content"]]  # fmt: skip
        return out

    @property
    def usage(self) -> dict | None:
        """The usage chunk's (``stream_options.include_usage``), if one came."""
        found = [e["usage"] for e in self.events if isinstance(e, dict) and e.get("usage")]
        return found[-1] if found else None

    @property
    def finish_reason(self) -> str | None:
        reasons = [e["choices"][0]["finish_reason"] for e in self.events
                   if isinstance(e, dict) and e.get("choices")]  # fmt: skip
        return next((r for r in reversed(reasons) if r), None)

    @property
    def errors(self) -> list[str]:
        return [e["error"]["message"] for e in self.events if isinstance(e, dict) and "error" in e]

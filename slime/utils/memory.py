"""Measured memory of the whole run: every process, sampled in the background.

An RL run is many processes: the driver, Ray's daemons (GCS, raylet, agents),
one worker per training actor and the rollout engine.  :class:`PeakMemoryTracker`
follows a set of *root* processes -- this process plus any pid registered with
:meth:`~PeakMemoryTracker.add_pid` -- and all their descendants, re-discovered at
every sample, so processes spawned later are counted from the next sample on.

What the numbers mean (Linux, read from ``/proc``):

* **RSS sum** (``peak_bytes``), sampled every ``interval_s`` (~0.2 s): the sum
  over processes of resident memory.  Pages shared between processes (the
  torch/CUDA libraries every worker maps, Ray's shared-memory object store)
  are counted once *per process*, so this over-states what the machine spent;
  it is the figure ``ps``/``top`` users expect and the one the run reports.
* **PSS sum** (``peak_pss_bytes``): proportional set size, each shared page
  split among its sharers, so the sum is what the run actually occupies.  The
  kernel walks every page table to produce it (~1 ms per process here), so it
  is sampled every ``pss_every``-th tick only and can miss short spikes.
* **VmHWM sum** (``hwm_sum_bytes``): the kernel's exact per-process peak RSS,
  summed over every process ever seen.  Per-process peaks need not coincide,
  so this is an *upper bound* on the true peak of the RSS sum, while the
  sampled ``peak_bytes`` is a *lower bound* (a spike shorter than the
  interval can fall between samples).  Together they bracket the truth.

A process is identified by ``(pid, start time)``: the kernel reuses pids, and a
recycled pid must not inherit a dead process's peak.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import psutil

GIB = 1024**3
_KIB = 1024


def _read_kib_fields(path: str, keys: tuple[str, ...]) -> dict[str, int]:
    """``Key:  <n> kB`` lines of a /proc file, in bytes; keys that are absent (a zombie) are 0."""
    found = dict.fromkeys(keys, 0)
    with open(path, "rb") as f:
        for line in f.read().decode("ascii", "replace").splitlines():
            key, _, rest = line.partition(":")
            if key in found:
                found[key] = int(rest.split()[0]) * _KIB
    return found


def process_peak_rss(pid: int) -> int:
    """Peak resident memory of a live process in bytes (``VmHWM`` of /proc/<pid>/status).

    Exact (the kernel updates it on every page-in), unlike sampling; raises
    ``FileNotFoundError``/``ProcessLookupError`` once the process is gone.
    """
    return _read_kib_fields(f"/proc/{pid}/status", ("VmHWM",))["VmHWM"]


def _process_rss_and_hwm(pid: int) -> tuple[int, int]:
    fields = _read_kib_fields(f"/proc/{pid}/status", ("VmRSS", "VmHWM"))
    return fields["VmRSS"], fields["VmHWM"]


def _process_pss(pid: int) -> int:
    # smaps_rollup (Linux >= 4.14) sums the per-mapping figures in the kernel.
    return _read_kib_fields(f"/proc/{pid}/smaps_rollup", ("Pss",))["Pss"]


_GONE = (psutil.NoSuchProcess, psutil.ZombieProcess, FileNotFoundError, ProcessLookupError)


@dataclass
class _Sample:
    rss_bytes: int
    pss_bytes: int | None
    processes: int


@dataclass
class _State:
    """Everything the sampling thread writes; read under the tracker's lock."""

    baseline_bytes: int = 0
    baseline_pss_bytes: int | None = None
    peak_bytes: int = 0
    peak_pss_bytes: int | None = None
    last: _Sample | None = None
    samples: int = 0
    max_processes: int = 0
    # (pid, start time) -> highest VmHWM read while it lived.
    hwm_bytes: dict[tuple[int, float], int] = field(default_factory=dict)


class PeakMemoryTracker:
    """Background sampler of the summed memory of this process tree and registered pids.

    Use as a context manager, or call :meth:`stop` when done::

        with PeakMemoryTracker() as mem:
            mem.add_pid(actor_pid)  # Ray actors of a joined cluster are not our children
            ...
        print(mem.summary())

    Args:
        interval_s: seconds between RSS samples.
        pss_every: sample PSS every this many RSS samples (0 disables PSS).
        start: begin sampling at once (the first sample is the baseline).
    """

    def __init__(self, interval_s: float = 0.2, *, pss_every: int = 5, start: bool = True) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be > 0 (got {interval_s})")
        self.interval_s = interval_s
        self.pss_every = pss_every
        self._roots: dict[int, psutil.Process] = {os.getpid(): psutil.Process()}
        self._lock = threading.Lock()
        self._state = _State()
        self._stop_event = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        if start:
            self.start()

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> None:
        """Take the baseline sample and start the background thread."""
        if self._thread is not None:
            return
        self._stop_event.clear()
        first = self._sample(with_pss=self.pss_every > 0)
        with self._lock:
            self._state.baseline_bytes = first.rss_bytes
            self._state.baseline_pss_bytes = first.pss_bytes
        self._thread = threading.Thread(target=self._run, name="peak-memory-tracker", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop sampling after one last sample; re-raises an error the sampling thread hit."""
        if self._thread is not None:
            self._stop_event.set()
            self._thread.join()
            self._thread = None
            self._sample(with_pss=self.pss_every > 0)
        if self._error is not None:
            raise RuntimeError("memory sampling thread failed") from self._error

    def __enter__(self) -> PeakMemoryTracker:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- what to follow ----------------------------------------------------

    def add_pid(self, pid: int) -> bool:
        """Follow ``pid`` and its descendants from the next sample on.

        Returns False (and follows nothing) when the process has already exited;
        a metrics helper must not crash the run for an actor that died early.
        """
        try:
            proc = psutil.Process(pid)
            proc.create_time()  # cached now, so a later pid reuse is detected
        except _GONE:
            return False
        with self._lock:
            self._roots.setdefault(pid, proc)
        return True

    def add_ray_cluster_processes(self, session_dir: str | os.PathLike | None = None) -> list[int]:
        """Follow this user's processes of one Ray session (raylet, GCS, agents, and through them the workers).

        Which processes belong to a run is decided by the *session directory*:
        Ray's daemons carry it on their command line (``--session_dir=...``,
        ``--log_dir=<session>/logs``), and the worker processes are the raylet's
        children.  Matching process names (``raylet``, ``ray::*``) instead would
        also count another user's or another run's cluster on a shared machine.
        Caveats, stated rather than hidden: a joined cluster's raylet may host
        other jobs' workers, which are then counted too; and a local cluster
        started by ``ray.init`` is already a child of this process, so this adds
        nothing new there (processes are never counted twice).

        ``session_dir`` defaults to the session of the connected Ray node. Returns
        the pids newly followed.
        """
        session = Path(session_dir) if session_dir is not None else _connected_ray_session_dir()
        needles = {str(session), str(session.resolve())}
        uid = os.getuid()
        followed = {proc.pid for proc in self._processes()}
        added: list[int] = []
        for proc in psutil.process_iter(["pid", "uids", "cmdline"]):
            info = proc.info
            if info["pid"] in followed or info["uids"] is None or info["uids"].real != uid:
                continue
            cmdline = " ".join(info["cmdline"] or ())
            if any(needle in cmdline for needle in needles) and self.add_pid(info["pid"]):
                added.append(info["pid"])
        return added

    # -- results -----------------------------------------------------------

    @property
    def peak_bytes(self) -> int:
        """Highest sampled sum of RSS since the tracker started."""
        with self._lock:
            return self._state.peak_bytes

    @property
    def peak_pss_bytes(self) -> int | None:
        """Highest sampled sum of PSS (None when PSS sampling is off)."""
        with self._lock:
            return self._state.peak_pss_bytes

    @property
    def baseline_bytes(self) -> int:
        """Summed RSS at start: what was resident before the tracked work began."""
        with self._lock:
            return self._state.baseline_bytes

    def current_bytes(self) -> int:
        """Summed RSS right now (a fresh sample, which also counts towards the peak)."""
        return self._sample(with_pss=False).rss_bytes

    def summary(self) -> dict[str, float | int | None]:
        """All figures in bytes; see the module docstring for what each one bounds."""
        with self._lock:
            state = self._state
            return {
                "peak_rss_bytes": state.peak_bytes,
                "peak_pss_bytes": state.peak_pss_bytes,
                "hwm_sum_bytes": sum(state.hwm_bytes.values()),
                "baseline_rss_bytes": state.baseline_bytes,
                "baseline_pss_bytes": state.baseline_pss_bytes,
                "current_rss_bytes": state.last.rss_bytes if state.last else 0,
                "processes_seen": len(state.hwm_bytes),
                "max_processes": state.max_processes,
                "samples": state.samples,
                "interval_s": self.interval_s,
            }

    def metrics(self) -> dict[str, float]:
        """The summary as loggable metrics in GiB, under ``mem/``."""
        summary = self.summary()
        out = {f"mem/{key.removesuffix('_bytes')}_gib": value / GIB
               for key, value in summary.items() if key.endswith("_bytes") and value is not None}
        out["mem/max_processes"] = float(summary["max_processes"])
        return out

    # -- sampling ----------------------------------------------------------

    def _run(self) -> None:
        tick = 0
        try:
            while not self._stop_event.wait(self.interval_s):
                tick += 1
                self._sample(with_pss=self.pss_every > 0 and tick % self.pss_every == 0)
        except BaseException as exc:  # surfaced by stop(), not lost in a daemon thread
            self._error = exc

    def _processes(self) -> list[psutil.Process]:
        """The live roots and all their descendants, each once."""
        with self._lock:
            roots = list(self._roots.items())
        found: dict[int, psutil.Process] = {}
        for pid, root in roots:
            if pid in found:
                continue
            if not root.is_running():  # exited, or its pid now names another process
                with self._lock:
                    self._roots.pop(pid, None)
                continue
            found[pid] = root
            try:
                children = root.children(recursive=True)
            except _GONE:
                continue
            for child in children:
                found.setdefault(child.pid, child)
        return list(found.values())

    def _sample(self, *, with_pss: bool) -> _Sample:
        rss_total, pss_total, counted = 0, 0, 0
        hwm: dict[tuple[int, float], int] = {}
        for proc in self._processes():
            try:
                key = (proc.pid, proc.create_time())
                rss, peak = _process_rss_and_hwm(proc.pid)
                pss = _pss_or_rss(proc.pid, rss) if with_pss else 0
            except _GONE:
                continue  # exited between discovery and reading: counted up to its last sample
            rss_total += rss
            pss_total += pss
            hwm[key] = peak
            counted += 1
        sample = _Sample(rss_total, pss_total if with_pss else None, counted)
        self._record(sample, hwm)
        return sample

    def _record(self, sample: _Sample, hwm: dict[tuple[int, float], int]) -> None:
        with self._lock:
            state = self._state
            state.samples += 1
            state.last = sample
            state.peak_bytes = max(state.peak_bytes, sample.rss_bytes)
            if sample.pss_bytes is not None:
                state.peak_pss_bytes = max(state.peak_pss_bytes or 0, sample.pss_bytes)
            state.max_processes = max(state.max_processes, sample.processes)
            for key, peak in hwm.items():
                state.hwm_bytes[key] = max(state.hwm_bytes.get(key, 0), peak)


def _pss_or_rss(pid: int, rss: int) -> int:
    """PSS, or RSS (an upper bound) when smaps_rollup is unreadable (another user's process)."""
    try:
        return _process_pss(pid)
    except PermissionError:
        return rss


def _connected_ray_session_dir() -> Path:
    import ray

    if not ray.is_initialized():
        raise RuntimeError("add_ray_cluster_processes() needs ray.init() first, or pass session_dir")
    # Ray has no public accessor for the session directory (ray 2.60).
    node = ray._private.worker._global_node
    if node is None:
        raise RuntimeError("this Ray driver has no local node; pass session_dir explicitly")
    return Path(node.get_session_dir_path())

"""Runs vLLM's OpenAI server as a child and takes its whole process group down with it.

Executed by the *vLLM* environment's python as a plain script (standard library only; slime
is not importable there): ``PYTHON vllm_launcher.py VLLM_SERVER_ARGS...``.  It is the leader of
its own process group (its parent made it one) and is told by the kernel to receive SIGTERM
when the thread that started it dies.  vLLM's server spawns an engine-core process and
workers; a server killed hard leaves those running.  So:

* on SIGTERM or SIGINT (the owner stops it, or the owner died): SIGTERM to the group, then
  SIGKILL to whatever is left after a grace period;
* when the server exits by itself (a crash, an OOM kill): SIGKILL to the rest of the group,
  then exit with the server's status (a signal ``n`` as ``128 + n``);
* when this launcher is killed outright (Ray SIGKILLs a dying worker's children): a reaper
  process, forked first into a session of its own and holding the read end of a pipe only the
  launcher writes to, sees the pipe close and ends the group (SIGTERM, then SIGKILL).  The
  server also gets SIGTERM from the kernel then (``PR_SET_PDEATHSIG``), but vLLM ignores it
  while it is still starting up.
"""

import ctypes
import os
import signal
import subprocess
import sys
import time

GRACE_S = 10.0


def group_members(pgid: int) -> list[int]:
    """Pids of the live (not zombie) processes in process group ``pgid``, this one excepted."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(entry))
    return members


def kill_group(pgid: int, first_signal: int, grace_s: float) -> None:
    for pid in group_members(pgid):
        try:
            os.kill(pid, first_signal)
        except OSError:
            pass
    deadline = time.monotonic() + grace_s
    while group_members(pgid) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in group_members(pgid):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def _sigterm_when_parent_dies():
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def start_reaper(pgid: int) -> int:
    """Fork the reaper; returns in the launcher only (which keeps the pipe's write end open)."""
    read_end, write_end = os.pipe()
    if os.fork() == 0:
        os.setsid()
        os.close(write_end)
        while os.read(read_end, 1):
            pass
        kill_group(pgid, signal.SIGTERM, GRACE_S)
        os._exit(0)
    os.close(read_end)
    return write_end


def main():
    pgid = os.getpgrp()
    start_reaper(pgid)
    # If this launcher is SIGKILLed (Ray kills a dying worker's children so), the kernel sends the
    # server SIGTERM, on which vLLM shuts its engine core down itself.
    server = subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.openai.api_server", *sys.argv[1:]],
                              preexec_fn=_sigterm_when_parent_dies)

    stopped_by = []

    def stop(signum, frame):
        # Runs inside the main thread's server.wait(): waiting here again would deadlock on Popen's
        # (non-reentrant) wait lock; that wait returns once kill_group has ended the server.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        stopped_by.append(signum)
        kill_group(pgid, signal.SIGTERM, GRACE_S)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    status = server.wait()
    kill_group(pgid, signal.SIGKILL, GRACE_S)
    if stopped_by:
        sys.exit(128 + stopped_by[0])
    sys.exit(128 - status if status < 0 else status)


if __name__ == "__main__":
    main()

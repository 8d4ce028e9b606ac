"""Hang and death detection for a job's processes, and the fault hooks that test them.

One thread per process, beating once a second. It stops the process, with a line that says
which process is at fault, when:
- a peer process has been silent for the peer timeout: it died, was frozen (SIGSTOP, a stuck
  node) or lost the network. Every process writes a counter to the coordination service's
  key-value store each second and watches the others'.
- the training loop made no progress (no step finished) for --step_timeout seconds, whatever it
  was doing: waiting on a collective a peer never joined, loading data, spinning. The allowance
  is STRETCH times longer for the first step (compilation) and around saves and evaluations.
  Each process publishes where its loop is (the step and what it does for it); the first to
  time out names the processes that hold the others up, prefers one stuck outside a device
  wait, and posts that line for every process to print.

The run loop calls `progress` when a step finished and `doing` when it enters a phase; both
only store a tuple, so they cost nothing when no thread watches.
"""

from __future__ import annotations

import os
import sys
import threading
import time

STRETCH = 3  # the first step (compilation), saves and evaluations may take this many timeouts
VERDICT = "megajax/verdict"
FAULT = "MEGAJAX_FAULT"  # test hook: "stall@P:STEP" or "sigterm@P:STEP" (process P, at STEP)
HOST_PHASES = ("loading data for",)  # phases outside any device wait or collective

_progress = None  # (step finished, monotonic time, allowance factor), set by the run loop
_phase = ("starting", 0)  # (what the loop does, for which step)


def progress(step: int, *, stretched: bool = False) -> None:
    """The loop finished `step` (or begins, before its first step: stretched)."""
    global _progress
    _progress = (step, time.monotonic(), STRETCH if stretched else 1)


def stretch() -> None:
    """Allow STRETCH timeouts from now (a save or an evaluation begins)."""
    global _progress
    if _progress is not None:
        _progress = (_progress[0], time.monotonic(), STRETCH)


def doing(phase: str, step: int) -> None:
    global _phase
    _phase = (phase, step)


def fault(step: int, process: int) -> None:
    """The test hook MEGAJAX_FAULT: stall this process's loop for good, or send it SIGTERM,
    when it begins `step` (a no-op unless the variable names this process and step)."""
    spec = os.environ.get(FAULT)
    if not spec:
        return
    kind, _, where = spec.partition("@")
    p, _, s = where.partition(":")
    if (int(p), int(s)) != (process, step):
        return
    if kind == "stall":
        while True:  # the process stays alive (its threads beat) but its loop never moves
            time.sleep(1)
    elif kind == "sigterm":
        import signal

        os.kill(os.getpid(), signal.SIGTERM)


def start(*, step_timeout: float, peer_timeout: float, multi_process: bool) -> None:
    """Watch this process's loop (step_timeout > 0) and, in a multi-process job (joined by
    jax.distributed.initialize), its peers."""
    client, me, count = None, 0, 1
    if multi_process:
        import jax

        # The key-value store of the coordination service jax.distributed.initialize joined:
        # JAX's public API (initialize, is_initialized, shutdown) exposes no handle to it.
        from jax._src import distributed

        client, me, count = (
            distributed.global_state.client,
            jax.process_index(),
            jax.process_count(),
        )
    elif step_timeout <= 0:
        return
    args = (client, me, count, step_timeout, peer_timeout)
    threading.Thread(target=_watch, args=args, daemon=True, name="megajax-watchdog").start()


def _watch(client, me: int, count: int, step_timeout: float, peer_timeout: float) -> None:
    seen = {p: (None, time.monotonic()) for p in range(count) if p != me}
    last_contact, beat = time.monotonic(), 0
    while True:
        now = time.monotonic()
        where = {me: _phase}
        if client is not None:
            try:
                phase, step = _phase
                client.key_value_set(f"megajax/alive/{me}", f"{beat}|{step}|{phase}", True)
                last_contact = now
                verdict = _try_get(client, VERDICT)
                if verdict:
                    _stop_all(verdict, client, me, count)
                for peer, (value, since) in seen.items():
                    current = _try_get(client, f"megajax/alive/{peer}")
                    peer_beat = None
                    if current:
                        peer_beat, step, phase = current.split("|", 2)
                        where[peer] = (phase, int(step))
                    if peer_beat != value:
                        seen[peer] = (peer_beat, now)
                    elif now - since > peer_timeout:
                        _fatal(
                            f"process {peer} of {count} has been silent for {peer_timeout:.0f}s "
                            f"(it died, was frozen or lost the network)"
                        )
            except Exception:  # the coordination service itself is unreachable
                if now - last_contact > peer_timeout:
                    _fatal(f"lost contact with the coordinator (process 0) for {peer_timeout:.0f}s")
        if step_timeout > 0 and _progress is not None:
            step, since, factor = _progress
            if now - since > factor * step_timeout:
                verdict = _stall_verdict(where, count, step, factor * step_timeout)
                if client is not None:
                    try:  # the others print the same line
                        client.key_value_set(VERDICT, verdict, True)
                    except Exception:
                        pass
                _stop_all(verdict, client, me, count)
        beat += 1
        time.sleep(1)


def _try_get(client, key: str):
    try:
        return client.key_value_try_get(key)
    except Exception:  # not set (yet)
        return None


def _stall_verdict(where: dict, count: int, step: int, waited: float) -> str:
    """The line naming the processes that hold the job up: those outside any device wait if
    some are, else those furthest behind."""
    stuck = [p for p, (phase, _) in where.items() if phase in HOST_PHASES]
    if not stuck:
        behind = min(s for _, s in where.values())
        stuck = [p for p, (_, s) in where.items() if s == behind]
    names = ", ".join(f"process {p} of {count} ({where[p][0]} step {where[p][1]})" for p in stuck)
    others = [p for p in sorted(where) if p not in stuck]
    rest = "; ".join(f"process {p}: {where[p][0]} step {where[p][1]}" for p in others)
    return (
        f"no training step finished for {waited:.0f}s after step {step} (--step_timeout): "
        f"stuck at {names}" + (f"; {rest}" if rest else "")
    )


def _stop_all(verdict: str, client, me: int, count: int) -> None:
    """Print the verdict and stop; process 0, whose exit ends the coordination service (and
    with it every other process, at once and without a word), waits for the others to have
    printed it too."""
    _say(verdict)
    if client is not None:
        try:
            client.key_value_set(f"megajax/stopping/{me}", "1", True)
            deadline = time.monotonic() + 10
            while me == 0 and time.monotonic() < deadline:
                if all(_try_get(client, f"megajax/stopping/{p}") for p in range(1, count)):
                    time.sleep(0.5)  # their exits are under way
                    break
                time.sleep(0.1)
        except Exception:
            pass
    os._exit(3)


def _fatal(why: str) -> None:
    _say(why)
    os._exit(3)


def _say(why: str) -> None:
    print(
        f"error: {why}; stopping this process too. Restart the whole job to resume from the "
        f"newest complete checkpoint.",
        file=sys.stderr,
        flush=True,
    )

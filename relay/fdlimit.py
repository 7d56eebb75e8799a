"""Raising the soft RLIMIT_NOFILE at start, as Go programs do (Go's runtime since 1.19).

A process usually starts with a soft descriptor limit of 1024 (or lower: a sandbox's
``ulimit -n``) under a much higher hard limit, which it may raise the soft one to without any
privilege. ``tunnel-agent run`` and ``tunneld serve`` do that at start, to the hard limit but not
past a ceiling of their own (the caller's ``wanted``): a hard limit of 2**30 or unlimited then does
not hand a huge soft limit to code (or a child) that loops over every possible descriptor. The
soft limit is never lowered, and a limit that cannot be raised is reported, never fatal.
"""

from __future__ import annotations

import resource

__all__ = ["nofile_target", "raise_nofile"]


def nofile_target(soft: int, hard: int, wanted: int) -> int | None:
    """The soft limit to set for limits ``(soft, hard)``: ``min(hard, wanted)`` when that is
    above ``soft``, else None (keep it)."""
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft == resource.RLIM_INFINITY or soft >= target:
        return None
    return target


def raise_nofile(wanted: int) -> tuple[int, int, str | None]:
    """Raise this process's soft RLIMIT_NOFILE to ``nofile_target(soft, hard, wanted)``.

    Returns ``(before, after, error)``: the soft limit before and after, and why it could not be
    raised (None when it was, or needed not be). Never raises."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (OSError, ValueError) as exc:  # pragma: no cover - getrlimit does not fail on Linux
        return (-1, -1, str(exc))
    target = nofile_target(soft, hard, wanted)
    if target is None:
        return (soft, soft, None)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (OSError, ValueError) as exc:  # e.g. a seccomp filter or a container that forbids it
        return (soft, soft, str(exc))
    return (soft, target, None)

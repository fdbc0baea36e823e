"""The interpreter's own costs, where they are ours to choose: a boot-path run is short-lived.

A run of the boot path lives a few tens of milliseconds and builds nothing
that must be freed before it ends, so two things the interpreter does by
default are pure cost there (docs/benchmark.md measures both):

- the cyclic garbage collector, which walks every young object each few
  hundred allocations: turned off for the run, ideally before the imports
  (initramfs/init's launch line does so first thing);
- the teardown at exit, which clears every module and frees every object
  one by one: skipped by flushing the standard streams, then `posix._exit`.
  Everything mobynit writes that must last goes through fileio's durable
  writes or is closed before this point (the boot record, the handover file).
"""

from __future__ import annotations

import gc
import posix
import sys

STATUS_FLUSH_FAILED = 1  # what python3.11 -c returns when stdout cannot be flushed at exit, whatever the code said


def short_lived() -> None:
    """No cyclic collection for the rest of this process."""
    gc.disable()


def finish(status: int) -> None:
    """Flush stdout and stderr, then end the process at once with `status` (never returns).

    An unflushable stdout (a closed pipe, a full disk) ends it as the
    interpreter's own exit would: said on stderr, status 1."""
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError) as e:
            if stream is sys.stdout:
                status = STATUS_FLUSH_FAILED
                try:
                    sys.stderr.write(f"cannot flush standard output: {e}\n")
                except (OSError, ValueError, AttributeError):
                    pass
    posix._exit(status)

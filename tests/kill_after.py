"""A tool SIGKILLed mid-run, like a pre-empted job, for the resume tests (the kill point lives here, not in the tools):

    python tests/kill_after.py tracin N [efficient_tracin flags]   # as the factor pass starts its (N+1)-th batch
    python tests/kill_after.py train N [train.py flags]            # as training step N finishes, before its bookkeeping
"""
import os
import signal
import sys


def kill_on_call(owner, name: str, n: int) -> None:
    """Replace owner.name so that its call number n (1-based) SIGKILLs the process instead."""
    seen, original = [], getattr(owner, name)

    def wrapper(*args, **kwargs):
        seen.append(1)
        if len(seen) == n:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(*args, **kwargs)

    setattr(owner, name, wrapper)


if __name__ == "__main__":
    tool, n, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    if tool == "tracin":
        from TracIn import efficient_tracin
        from TracIn.core import factors

        kill_on_call(factors, "batch_to_device", n + 1)
        efficient_tracin.main(argv)
    else:
        import train
        from lib.training_dynamics import DynamicsRecorder

        kill_on_call(DynamicsRecorder, "record", n)
        train.main(argv)

"""efficient_tracin, SIGKILLed as the factor pass starts its (N+1)-th batch (a kill mid-run, for the resume tests):

    python tests/kill_after.py N --output_dir ... [efficient_tracin flags]
"""
import os
import signal
import sys

from TracIn import efficient_tracin, factors

if __name__ == "__main__":
    limit, seen, to_device = int(sys.argv[1]), [], factors.batch_to_device

    def batch_to_device(x, device):
        if len(seen) == limit:
            os.kill(os.getpid(), signal.SIGKILL)
        seen.append(1)
        return to_device(x, device)

    factors.batch_to_device = batch_to_device
    efficient_tracin.main(sys.argv[2:])

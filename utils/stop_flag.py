"""The stop request of a training run: SIGTERM / SIGINT, read by the training loop at its checks."""
import os
import signal
import sys


class StopFlag:
    """SIGTERM / SIGINT ask the training loop to save and stop at its next check (`signum`: the first signal).
    A second Ctrl-C (SIGINT after either) stops at once, nothing saved, with the shell's exit status 130."""

    def __init__(self, prog: str = "train_hivg.py"):
        self.prog, self.signum = prog, 0
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def close(self) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame):
        if self.signum and signum == signal.SIGINT:
            print(f"{self.prog}: second interrupt: stopping at once, without saving", file=sys.stderr, flush=True)
            sys.stdout.flush()
            os._exit(128 + signum)  # no exit handlers: they would wait for the loader workers
        self.signum = self.signum or signum

    def __call__(self) -> bool:
        return self.signum != 0

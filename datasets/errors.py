"""Bad input, reported as one line: the error path every layer shares.

Code that knows which file or flag is at fault raises UserError (or the ValueError / FileNotFoundError the
library raises for a bad file) with a message naming it and the fix; a tool's `main` decorated with
`reports_errors` turns it into `prog: error: ...` and exit status 2. Anything else is a bug and keeps its
traceback. It sits in the lowest layer (datasets/) so that datasets/, models/ and utils/ raise one class;
utils.errors re-exports it with what only the training and evaluation scripts need.

Under torchrun every rank runs the tool: an error that all ranks raise alike (`every_rank`) is reported by
rank 0 alone; any other is reported by the rank that raised it, named in the line when it is not rank 0.
"""
import functools
import os
import sys
import traceback

USER_ERRORS_EXIT = 2


class UserError(Exception):
    """A problem with the inputs: reported as one line, exit status 2, no traceback."""

    def __init__(self, message: str = "", every_rank: bool = False):
        # Raised in a DataLoader worker, torch re-raises it in the main process as UserError(text of the
        # worker's traceback); the last line of that text is this class's name and the original message.
        tail = message.rstrip().rsplit("\n", 1)[-1]
        prefix = f"{__name__}.{UserError.__qualname__}: "
        super().__init__(tail[len(prefix):] if "\n" in message.rstrip() and tail.startswith(prefix) else message)
        self.every_rank = every_rank


def reports_errors(prog: str):
    """Decorate a tool's `main(argv) -> int`: a UserError, ValueError or FileNotFoundError becomes one
    `prog: error: ...` line on stderr and the return value USER_ERRORS_EXIT."""
    def decorate(main):
        @functools.wraps(main)
        def run(argv=None) -> int:
            try:
                return main(argv)
            except (UserError, ValueError, FileNotFoundError) as e:
                rank = int(os.environ.get("RANK", "0"))   # set by torchrun, before any process group exists
                if rank == 0 or not getattr(e, "every_rank", False):
                    print(f"{prog}: error: {f'rank {rank}: ' if rank else ''}{e}", file=sys.stderr, flush=True)
                # An error re-raised from DataLoader workers sits in a reference cycle (torch's re-raise keeps it
                # in its frame) holding the loader's iterator. Clearing the frames frees the iterator now, which
                # stops its workers; otherwise the exit handlers send SIGTERM to workers that ignore it
                # (train_hivg.ignore_stop_signals) and wait for them forever.
                traceback.clear_frames(e.__traceback__)
            return USER_ERRORS_EXIT
        return run
    return decorate

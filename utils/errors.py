"""The one error path of the command-line tools: bad input is one line on stderr and exit status 2.

Code that knows which file or flag is at fault raises UserError (or the ValueError / FileNotFoundError the
library raises for a bad file) with a message naming it and the fix; `reports_errors` turns it into
`prog: error: ...`. Anything else is a bug and keeps its traceback.
"""
import functools
import sys
import traceback

USER_ERRORS_EXIT = 2


class UserError(Exception):
    """A problem with the inputs: reported as one line, exit status 2, no traceback."""

    def __init__(self, message: str = ""):
        # Raised in a DataLoader worker, torch re-raises it in the main process as UserError(text of the
        # worker's traceback); the last line of that text is this class's name and the original message.
        tail = message.rstrip().rsplit("\n", 1)[-1]
        prefix = f"{__name__}.{UserError.__qualname__}: "
        super().__init__(tail[len(prefix):] if "\n" in message.rstrip() and tail.startswith(prefix) else message)


def reports_errors(prog: str):
    """Decorate a tool's `main(argv) -> int`: a UserError, ValueError or FileNotFoundError becomes one
    `prog: error: ...` line on stderr and the return value USER_ERRORS_EXIT."""
    def decorate(main):
        @functools.wraps(main)
        def run(argv=None) -> int:
            try:
                return main(argv)
            except (UserError, ValueError, FileNotFoundError) as e:
                print(f"{prog}: error: {e}", file=sys.stderr, flush=True)
                # An error re-raised from DataLoader workers sits in a reference cycle (torch's re-raise keeps it
                # in its frame) holding the loader's iterator. Clearing the frames frees the iterator now, which
                # stops its workers; otherwise the exit handlers send SIGTERM to workers that ignore it
                # (train_hivg.ignore_stop_signals) and wait for them forever.
                traceback.clear_frames(e.__traceback__)
            return USER_ERRORS_EXIT
        return run
    return decorate

"""The one error path of the command-line tools: bad input is one line on stderr and exit status 2.

`UserError` and `reports_errors` live in the lowest layer, datasets.errors (every layer raises UserError);
they are re-exported here with what only the scripts that run under torchrun need.
"""
from contextlib import contextmanager

from datasets.errors import USER_ERRORS_EXIT, UserError, reports_errors

__all__ = ["USER_ERRORS_EXIT", "UserError", "alike_on_every_rank", "reports_errors"]


@contextmanager
def alike_on_every_rank():
    """For code that reads only what every rank reads (flags, files): its user errors are every rank's."""
    try:
        yield
    except (UserError, ValueError, FileNotFoundError) as e:
        raise UserError(str(e), every_rank=True) from None

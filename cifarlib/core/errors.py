"""How expected user errors reach the user: one message, never a traceback.

Code raises `UserError` for mistakes a user can fix (missing data, a bad config, a corrupt file).
Command-line entry points wrap their body in `cli_errors()`, which prints the message and exits
non-zero; notebooks call `show_errors_briefly()` once, after which IPython shows a `UserError` as
its message alone. Any other exception is a bug and keeps its full traceback. `notice()` says
something worth knowing that is not an error (a cache rebuilt, files skipped).
"""

from __future__ import annotations

import errno
import sys
from contextlib import contextmanager
from typing import Iterator

from .ranks import is_main_process


class UserError(Exception):
    """A problem the user can fix; its message says what happened and how to fix it."""


def chain(e: BaseException | None) -> Iterator[BaseException]:
    """`e`, then the exception it was raised from or while handling (`__cause__`, else
    `__context__`), and so on. Libraries wrap the system's error: `torch.save` turns a failed
    write into a `RuntimeError` raised while handling the `OSError` (errno 28 on a full disk)."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def os_error(e: BaseException) -> OSError | None:
    """The first `OSError` along `e`'s chain, or None."""
    return next((x for x in chain(e) if isinstance(x, OSError)), None)


def disk_full(e: BaseException, path, kept: str, fix: str) -> UserError | None:
    """The one message for a full disk (or an exhausted quota) while writing `path`, saying what
    was kept and how to go on; None for any other error. The whole chain of `e` is looked at."""
    if any(isinstance(x, OSError) and x.errno in (errno.ENOSPC, errno.EDQUOT) for x in chain(e)):
        return UserError(f"no space left on the disk while writing {path}; {kept}. {fix}")
    return None


def notice(message: str) -> None:
    """One line on stderr, from the main process only (under torchrun, rank 0)."""
    if is_main_process():
        print(message, file=sys.stderr, flush=True)


@contextmanager
def cli_errors(prog: str, quiet: bool = False):
    """Turn a `UserError` raised inside the block into `prog: error: ...` on stderr and exit 2
    (or, for one that carries an `exit_status`, such as an interrupted run's 130 or 143, its
    message alone and that status). `quiet` exits the same way without printing (the other
    ranks of a torchrun job, so that the message shows once)."""
    try:
        yield
    except UserError as e:
        status = getattr(e, "exit_status", 2)
        if not quiet:
            print(f"{prog}: error: {e}" if status == 2 else f"{prog}: {e}", file=sys.stderr)
        raise SystemExit(status) from None
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        raise SystemExit(130) from None


def _brief_handler(shell, etype, value, tb, tb_offset=None):
    # IPython discards what a handler returns when a cell raises, so show the message here;
    # `_showtraceback` is the hook ipykernel overrides to send an error to the notebook. The cell
    # still fails, so papermill stops there.
    shell._showtraceback(etype, value, [f"{etype.__name__}: {value}"])


def show_errors_briefly() -> None:
    """In IPython/Jupyter, show each `UserError` as its message instead of a traceback."""
    try:
        from IPython import get_ipython
    except ImportError:
        return
    shell = get_ipython()
    if shell is not None:
        shell.set_custom_exc((UserError,), _brief_handler)

"""Ray Train's SIGINT handler, removed once ``TorchTrainer.fit`` has returned or raised.

Ray Train v2's ``DataParallelTrainer.fit`` installs a SIGINT handler (abort the run's controller)
and never removes it. A Ctrl-C that reaches the stage after fit, while the process winds down
(the second SIGINT of a terminal, or DVC's forwarding), then runs it during the interpreter's
exit: the controller is gone, the handler calls ``sys.exit(0)`` inside an atexit callback, and
Python prints "Exception ignored in atexit callback ... sigint_handler ... SystemExit: 0" before
the stage's clean "interrupted" line. :func:`own_sigint` puts the stage's handler back, and
turns the ``sys.exit(0)`` of that handler's third SIGINT (Ray's "forcefully aborting") into the
KeyboardInterrupt it stands for: a stopped stage must not exit 0. (pipeline.cli.run_stage
ignores the stop signals once the stage is exiting.)
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


@contextlib.contextmanager
def own_sigint() -> Iterator[None]:
    """Within the block, anyone may replace the SIGINT handler; after it, ours is back."""
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread can set handlers (Ray Train does not either)
        return
    saved = signal.getsignal(signal.SIGINT)
    try:
        yield
    except SystemExit as e:
        if e.code not in (0, None):
            raise
        raise KeyboardInterrupt from None  # Ray Train's handler, third Ctrl-C
    finally:
        signal.signal(signal.SIGINT, saved)

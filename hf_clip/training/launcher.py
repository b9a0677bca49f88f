"""Training processes end with their launcher.

torch's elastic agent (behind `accelerate launch` and `torchrun`) starts every worker in a session of its own
(`start_new_session=True`), so a signal to the launcher's process group never reaches them. SIGTERM, SIGINT, SIGHUP or
SIGQUIT to the launcher are forwarded to the workers by the agent; a SIGKILL of the launcher (or `kill -9` of its
group) would leave them training. `end_with_launcher` asks the Linux kernel to send a worker SIGTERM when its
launcher dies, whatever killed it."""

import ctypes
import logging
import os
import signal
import sys

logger = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def end_with_launcher() -> None:
    """In a worker started by torch's elastic agent on Linux: SIGTERM this process when the launcher exits."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return
    launcher = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        logger.warning(
            "prctl(PR_SET_PDEATHSIG) failed (errno %d): this worker outlives a killed launcher", ctypes.get_errno()
        )
    elif os.getppid() != launcher:  # the launcher died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)

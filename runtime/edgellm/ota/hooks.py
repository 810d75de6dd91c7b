"""Test hook: make the process stop dead at a named stage of an install.

    EDGELLM_TEST_CRASH_AT=STAGE    SIGKILL this process when it reaches STAGE

Stages, in install order: upload (first chunk written), staging (first engine file
unpacked), verified (every check passed, nothing committed), committed (the version
directory is in the store, pointers untouched), pointers (between the `previous` and
`current` pointer writes).

This exists for the crash-safety tests (a real SIGKILL at a real moment). It is read from
the environment on each call and does nothing unless set; never set it on a device.
"""

from __future__ import annotations

import os
import signal

STAGES = ("upload", "staging", "verified", "committed", "pointers")
CRASH_ENV = "EDGELLM_TEST_CRASH_AT"


def stage(name: str) -> None:
    assert name in STAGES, name
    if os.environ.get(CRASH_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)

"""Test hooks: make an install die at a named stage, or a new engine fail once it serves.

    EDGELLM_TEST_CRASH_AT=STAGE        SIGKILL this process when it reaches STAGE
    EDGELLM_TEST_BREAK_ENGINE=ENGINE_ID  an engine with this id passes its smoke test, then
                                       every decode step raises (health must roll it back)

Stages, in install order: upload (first chunk written), staging (first engine file
unpacked), verified (every check passed, nothing committed), committed (the version
directory is in the store, pointers untouched), pointers (between the `previous` and
`current` pointer writes), activated (`current` names the new version, nothing after done).

They exist for the crash-safety and automatic-rollback tests (a real SIGKILL at a real
moment, a real failing engine under the real scheduler). They are read from the
environment on each call and do nothing unless set; never set them on a device.
"""

from __future__ import annotations

import os
import signal

STAGES = ("upload", "staging", "verified", "committed", "pointers", "activated")
CRASH_ENV = "EDGELLM_TEST_CRASH_AT"
BREAK_ENV = "EDGELLM_TEST_BREAK_ENGINE"


def stage(name: str) -> None:
    assert name in STAGES, name
    if os.environ.get(CRASH_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


def break_engine_if_asked(engine) -> None:
    if not os.environ.get(BREAK_ENV) or os.environ[BREAK_ENV] != engine.engine_id:
        return

    def broken_decode(*_args, **_kwargs):
        raise RuntimeError(f"engine {engine.engine_id} broken by the {BREAK_ENV} test hook")

    engine.decode = broken_decode

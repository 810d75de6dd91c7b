"""Every update event goes to the journal (through logging) and to an append-only JSON-lines file.

One line per event: {"time", "event", ...fields}. Events: received, rejected, installed,
activated, rolled-back, pruned, recovered. The file is opened O_APPEND for every event and
fsync'd, so concurrent writers never interleave within a line and a crash loses at most
the event being written.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("edgellm.ota")

_LEVELS = {"rejected": logging.WARNING, "rolled-back": logging.WARNING}


class AuditLog:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def record(self, event: str, **fields: Any) -> dict[str, Any]:
        entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "event": event}
        entry.update({k: v for k, v in fields.items() if v is not None})
        summary = " ".join(f"{k}={v}" for k, v in entry.items() if k not in ("time", "event", "message"))
        message = fields.get("message")
        log.log(_LEVELS.get(event, logging.INFO), "update %s: %s%s", event, summary, f" -- {message}" if message else "")
        line = (json.dumps(entry, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
        return entry

    def read(self) -> list[dict[str, Any]]:
        """All events, oldest first; a torn last line (crash mid-write) is skipped."""
        try:
            lines = self.path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return []
        events = []
        for line in lines:
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return events

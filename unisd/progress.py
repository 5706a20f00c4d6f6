"""Periodic progress lines for long loops: logged (so they reach files, CI logs and the
Prefect UI), not drawn as terminal bars."""

from __future__ import annotations

import logging
import time

log = logging.getLogger("unisd.progress")


class Progress:
    def __init__(self, desc: str, total: int, unit: str = "items", every_s: float = 15.0) -> None:
        self.desc, self.total, self.unit, self.every_s = desc, total, unit, every_s
        self.done, self.tokens = 0, 0
        self.start = self.last = time.monotonic()

    def update(self, n: int = 1, tokens: int = 0) -> None:
        self.done += n
        self.tokens += tokens
        now = time.monotonic()
        if now - self.last >= self.every_s and self.done < self.total:
            self.last = now
            self._line("")

    def close(self) -> float:
        """Log the final line (unless the loop was too short to matter); returns the seconds."""
        elapsed = time.monotonic() - self.start
        if elapsed >= 2.0 or self.last != self.start:
            self._line(" done")
        return elapsed

    def _line(self, suffix: str) -> float:
        elapsed = time.monotonic() - self.start
        rate = f", {self.tokens / max(elapsed, 1e-9):.1f} tok/s" if self.tokens else ""
        log.info("%s: %d/%d %s in %.0fs%s%s", self.desc, self.done, self.total, self.unit, elapsed, rate, suffix)
        return elapsed

"""Stop strings: find them in the growing text and hold back any tail that might become one."""

from __future__ import annotations


class StopStrings:
    def __init__(self, stops: tuple[str, ...]):
        self.stops = stops
        self.longest = max((len(s) for s in stops), default=0)

    def find(self, text: str, new_from: int) -> int | None:
        """Start of the earliest stop string that overlaps text[new_from:], or None."""
        window_start = max(0, new_from - self.longest + 1)
        hits = [i for i in (text.find(s, window_start) for s in self.stops) if i != -1]
        return min(hits) if hits else None

    def safe_length(self, text: str) -> int:
        """How much of text can be shown: all but the longest suffix that starts some stop string."""
        for size in range(min(self.longest - 1, len(text)), 0, -1):
            tail = text[-size:]
            if any(stop.startswith(tail) for stop in self.stops):
                return len(text) - size
        return len(text)

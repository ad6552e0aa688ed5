"""What the page keeps of each visitor's analyses, so that a new opacity only re-blends and a
model or view picked again costs no model run.

A page session holds only keys; the analyses live here, in one bounded table
for all visitors: at most MOST_KEPT analyses, each for KEPT_FOR_S seconds after its last use, the least
recently used dropped first. Each is stored at display size as 8-bit data (the X-ray, the map,
the lung mask) with its verdict: about 2 MiB for a 1024-px image, where the float arrays took
7-9 MiB a session for an hour. A visitor whose map was dropped analyses again.

An analysis's key (`KeptMaps.key_for`) is a keyed hash of the page session, the file's bytes, the
model and the map asked for: the same request from the same session finds it again, and no
session can find, or time, another's (the key is secret to the server; nothing is shared across
sessions, not even for the same X-ray).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from dataclasses import dataclass

import numpy as np
from cachetools import TTLCache
from PIL import Image

from ..explain import overlay

MOST_KEPT = 48
KEPT_FOR_S = 600


@dataclass
class Shown:
    """The last analysis as the page shows it: 8-bit X-ray and map, display size."""

    image: np.ndarray  # uint8 (H, W), the input as the model read it
    heatmap: np.ndarray  # uint8 (H, W): the map as the colour map reads it (255 x map, truncated)
    lung_mask: np.ndarray | None  # bool (H, W); None: no outline
    verdict: object = None  # the analysis's report.Verdict
    key: str | None = None  # its key in KeptMaps, once kept

    @classmethod
    def of(cls, image: np.ndarray, heatmap: np.ndarray, lung_mask: np.ndarray | None, verdict=None) -> "Shown":
        """From float images in [0, 1]."""
        return cls((image * 255).round().astype(np.uint8), np.uint8(255 * heatmap), lung_mask, verdict)

    def overlay(self, opacity: float) -> Image.Image:
        # The colour map takes uint8(255 x map): a quarter step up keeps the stored value exact.
        return overlay(self.image.astype(np.float32) / 255, (self.heatmap.astype(np.float32) + 0.25) / 255,
                       opacity, self.lung_mask)

    @property
    def nbytes(self) -> int:
        return self.image.nbytes + self.heatmap.nbytes + (0 if self.lung_mask is None else self.lung_mask.nbytes)


class KeptMaps:
    """The table (cachetools.TTLCache: least recently used dropped first, each entry expiring
    `lifetime_s` after it was last kept or read), keyed by `key_for`. `clock`: seconds, monotonic
    (a test passes its own)."""

    def __init__(self, most: int = MOST_KEPT, lifetime_s: float = KEPT_FOR_S, clock=time.monotonic):
        self.most, self.lifetime_s = most, lifetime_s
        self.entries: TTLCache[str, Shown] = TTLCache(maxsize=most, ttl=lifetime_s, timer=clock)
        self.lock = threading.Lock()  # handlers on several threads read and keep
        self._secret = secrets.token_bytes(32)  # new at each start: keys are good for this server only

    def key_for(self, *parts: str) -> str:
        """The key of an analysis described by `parts` (session, file digest, model, method, class)."""
        return hmac.new(self._secret, "\x1f".join(map(str, parts)).encode(), hashlib.sha256).hexdigest()

    def keep(self, shown: Shown, key: str | None = None) -> str:
        """Keep `shown` under `key` (default: a new random one); returns the key."""
        key = key or secrets.token_urlsafe(16)
        with self.lock:
            self.entries[key] = shown
        return key

    def get(self, key) -> Shown | None:
        if not isinstance(key, str):
            return None
        with self.lock:
            shown = self.entries.get(key)
            if shown is not None:
                self.entries[key] = shown  # a re-blend keeps it alive: its lifetime starts again
            return shown

    def __len__(self) -> int:
        with self.lock:
            self.entries.expire()
            return len(self.entries)

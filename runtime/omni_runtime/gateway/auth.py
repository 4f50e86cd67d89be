"""API keys: `Authorization: Bearer <key>` checked against OMNI_API_KEYS_FILE (one key per
line, `#` comments), re-read when the file changes (a mounted Secret is updated in place)."""

from __future__ import annotations

import os


class ApiKeys:
    def __init__(self, path: str | None):
        self.path = path
        self.mtime = None
        self.keys: set[str] = set()

    def _load(self):
        if not self.path:
            return
        try:
            mtime = os.stat(self.path).st_mtime
        except FileNotFoundError:
            self.keys = set()
            return
        if mtime != self.mtime:
            with open(self.path) as fh:
                self.keys = {ln.strip() for ln in fh if ln.strip() and not ln.startswith("#")}
            self.mtime = mtime

    def check(self, header: str | None) -> bool:
        if not self.path:
            return True
        self._load()
        if not header or not header.startswith("Bearer "):
            return False
        return header[7:].strip() in self.keys

"""How a job of real work (sh, exec, call) ended: the payload of its Result.

A worker that runs such a job answers with a Result whose value is 0 if the job succeeded
(exit status 0; the call returned) and 1 if not, and whose payload is this JSON object:

    {"d": 0.012}                          done in 0.012 s (sh, exec)
    {"d": 0.3, "x": 3}                    exited with status 3: failed
    {"d": 0.0, "x": 127, "e": "..."}      could not be started: failed, with why
    {"d": 0.1, "r": [640, 480]}           a call's return value (JSON)
    {"d": 0.1, "e": "ValueError: bad"}    a call that raised, or could not be imported

A command killed by a signal, or past its timeout, sends no Result: its worker exits (see
core/commands.py), and the Dealer's supervision rules treat it as a crash.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from taskpool.wire import ProtocolError


@dataclass(frozen=True)
class Ending:
    duration: float  # seconds, from the start of the command (or call) to its end
    exit_status: int | None = None  # sh, exec: the command's exit status
    result: Any = None  # call: its return value, JSON
    error: str | None = None  # why it failed, where an exit status does not say it all

    @property
    def succeeded(self) -> bool:
        return self.error is None and not self.exit_status

    def encode(self) -> bytes:
        body: dict[str, Any] = {"d": round(self.duration, 6)}
        if self.exit_status is not None:
            body["x"] = self.exit_status
        if self.result is not None:
            body["r"] = self.result
        if self.error is not None:
            body["e"] = self.error
        return json.dumps(body, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, payload: bytes) -> Ending:
        try:
            body = json.loads(payload)
            return cls(float(body["d"]), body.get("x"), body.get("r"), body.get("e"))
        except (ValueError, TypeError, KeyError) as e:
            raise ProtocolError(f"bad command ending {payload[:80]!r}: {e}") from None

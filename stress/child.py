"""A campaign's child process: a fresh interpreter that runs one function of a campaign module.

    python -m stress.child stress.kill.save_steps '{"url": ..., "first": 3}'

The child talks to the harness in lines on stdout (``ready``, ``committed 4``, ...) so that the
harness can time a SIGKILL against what the child has reached. Children inherit the harness's
environment: dummy cloud credentials and loopback endpoints only (see backends.py).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def say(*words: object) -> None:
    """One line to the harness, flushed at once (it may be the last before a SIGKILL)."""
    print(*words, flush=True)


@dataclass
class Child:
    """A running child; its stdout lines are collected by a thread, with their arrival time."""

    proc: subprocess.Popen
    lines: list[tuple[float, str]] = field(default_factory=list)
    stderr: str = ""

    @classmethod
    def start(cls, func: str, args: dict[str, Any], *, preexec: Any = None) -> Child:
        path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
        env = dict(os.environ, PYTHONPATH=path, JAX_PLATFORMS="cpu")
        proc = subprocess.Popen(
            [sys.executable, "-m", "stress.child", func, json.dumps(args)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=preexec,
        )
        child = cls(proc)
        threading.Thread(target=child._read, daemon=True).start()
        return child

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append((time.monotonic(), line.strip()))

    def wait_for(self, word: str, timeout: float) -> float | None:
        """The time the child said a line starting with ``word``, waiting up to ``timeout``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for t, line in list(self.lines):
                if line.split(" ", 1)[0] == word:
                    return t
            if self.proc.poll() is not None and not self._reading():
                return None
            time.sleep(0.005)
        return None

    def _reading(self) -> bool:
        return self.proc.stdout is not None and not self.proc.stdout.closed

    def said(self, word: str) -> list[str]:
        """The rest of every line that started with ``word``."""
        return [line[len(word) + 1 :] for _, line in list(self.lines) if line.split(" ")[0] == word]

    def kill(self) -> None:
        # Never reaped before this, so the pid is still this child's (at worst a zombie).
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGKILL)

    def finish(self, timeout: float) -> int | None:
        """Reap the child (killing it after ``timeout``); its exit status, None if it hung."""
        hung = False
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            hung = True
            self.kill()
            self.proc.wait()
        assert self.proc.stderr is not None
        self.stderr = self.proc.stderr.read()
        time.sleep(0.01)  # let the reader thread take the last lines
        return None if hung else self.proc.returncode

    def last_error(self) -> str:
        lines = [x for x in self.stderr.strip().splitlines() if x.strip()]
        return lines[-1][:300] if lines else ""


def main() -> None:
    module, name = sys.argv[1].rsplit(".", 1)
    getattr(importlib.import_module(module), name)(**json.loads(sys.argv[2]))


if __name__ == "__main__":
    main()

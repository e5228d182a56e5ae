"""A function run in a second, fresh Python process: the world build trains its decoder side this way while
the backbone trains, one thread each.

    side = SecondProcess("unipers.world.build:_decoder_side", folder, root=..., seed=0, ...)
    ...
    info = side.result()      # its return value (JSON), or RuntimeError with its output
    side.stop()               # in a finally: ends it if still running

``python -c`` rather than multiprocessing: the caller's script is not run again (as spawn would) and no
torch threads are forked. Arguments go in as JSON on stdin; the return value comes back as JSON in a file
in ``folder``.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import tempfile
from pathlib import Path


class SecondProcess:
    def __init__(self, target: str, folder: Path, **kwargs):
        import subprocess

        self.target = target
        fd, self.result_file = tempfile.mkstemp(prefix=".second-process-", suffix=".json", dir=folder)
        os.close(fd)
        self.log = tempfile.TemporaryFile()
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        self.process = subprocess.Popen(
            [sys.executable, "-c", "from unipers.world.process import main; main()"],
            stdin=subprocess.PIPE, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        payload = {"target": target, "result": self.result_file, "kwargs": kwargs}
        self.process.stdin.write(json.dumps(payload).encode())
        self.process.stdin.close()

    def result(self) -> dict:
        code = self.process.wait()
        if code != 0:
            self.log.seek(0)
            tail = self.log.read().decode(errors="replace")[-4000:]
            raise RuntimeError(f"the second process running {self.target} failed (exit {code}):\n{tail}")
        return json.loads(Path(self.result_file).read_text())

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait()
        self.log.close()
        Path(self.result_file).unlink(missing_ok=True)


def main() -> None:
    """The second process: call the target with the JSON arguments on stdin; its result into the file named."""
    import signal

    # stop() terminates: exit through Python, so half-written stage folders are removed on the way out
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    payload = json.loads(sys.stdin.read())
    module, _, name = payload["target"].partition(":")
    result = getattr(importlib.import_module(module), name)(**payload["kwargs"])
    Path(payload["result"]).write_text(json.dumps(result))

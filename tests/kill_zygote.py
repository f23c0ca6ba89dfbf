"""A process that imports npr once and then forks training runs on request, so that a
fault-injection test can start, kill -9 and restart many runs in little time.

Protocol (one JSON object per line on stdin, one reply per line on stdout):
  {"op": "run", "args": [...], "log": PATH, "kill_after": SECONDS or null}
      fork a child running ``npr <args>`` (output to PATH); SIGKILL it after ``kill_after``
      seconds if it still runs; reply {"killed": bool, "status": exit status or null}.
The zygote itself never runs a torch op, so forking it is safe.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402,F401  (heavy imports once, before any fork)
import transformers  # noqa: E402,F401

import npr.train.stage1  # noqa: E402,F401
import npr.train.stage2  # noqa: E402,F401
import npr.train.stage3  # noqa: E402,F401
from npr.cli.main import main  # noqa: E402


def run(args: list[str], log: str, kill_after: float | None) -> dict:
    pid = os.fork()
    if pid == 0:  # the child: one training run
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        torch.set_num_threads(1)
        try:
            code = main(args)
        except BaseException:  # noqa: BLE001  (report, then exit like a crashed process)
            import traceback

            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code if isinstance(code, int) else 1)
    deadline = None if kill_after is None else time.monotonic() + kill_after
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return {"killed": False, "status": os.waitstatus_to_exitcode(status)}
        if deadline is not None and time.monotonic() >= deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return {"killed": True, "status": None}
        time.sleep(0.005)


if __name__ == "__main__":
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        print(json.dumps(run(request["args"], request["log"], request.get("kill_after"))), flush=True)

"""Run many `dpo-align` command lines quickly, each in its own process.

Importing torch, transformers, TRL and lm-eval takes seconds; a hundred command lines that
each pay it would take minutes. This server imports them once, computes nothing, and forks
a child per command line: the child is a fresh process running the real entry point
(``dpo_align.cli.main``) with its own argv, environment, stdout and stderr, and exits the
way the ``dpo-align`` script would (an uncaught exception prints its traceback, exit 1).

Protocol: one JSON object per line on stdin ({"args", "env", "stdout", "stderr"}); one JSON
object per line on stdout ({"code"}).
"""

from __future__ import annotations

import json
import os
import sys
import traceback

import datasets  # noqa: F401
import lm_eval  # noqa: F401
import peft  # noqa: F401
import torch  # noqa: F401
import transformers  # noqa: F401
import trl  # noqa: F401

import dpo_align.cli


def run_child(request: dict) -> None:
    os.environ.update(request.get("env") or {})
    for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(target, fd)
        os.close(target)
    sys.stdout = os.fdopen(1, "w", buffering=1)
    sys.stderr = os.fdopen(2, "w", buffering=1)
    sys.argv = ["dpo-align", *request["args"]]
    code = 0
    try:
        dpo_align.cli.main()
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main() -> None:
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            run_child(request)
        _, status = os.waitpid(pid, 0)
        replies.write(json.dumps({"code": os.waitstatus_to_exitcode(status)}) + "\n")


if __name__ == "__main__":
    main()

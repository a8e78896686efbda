"""``imagegenx worker`` whose process dies (``os._exit``) on any job whose prompt contains POISON.

A job that deterministically kills the worker that takes it, for the delivery-cap test: the queue,
the database and the other jobs stay real; only this process crashes, as a segfault or the OOM
killer would make it.
"""

import os
import sys

from imagegenx.cli import main
from imagegenx.engine import engine as engine_module

POISON = "POISON"
_submit = engine_module.Engine.submit


def _submit_or_die(self, job):
    if POISON in job.prompt:
        os._exit(86)
    return _submit(self, job)


engine_module.Engine.submit = _submit_or_die

if __name__ == "__main__":
    sys.argv[0] = "imagegenx"
    sys.exit(main())

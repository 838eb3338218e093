"""What every thin command-line script shares: run one library call; a user error prints one line and exits 2."""

from __future__ import annotations

import sys
from typing import Callable


def run(work: Callable, config, errors: type | tuple, show: Callable) -> int:
    try:
        result = work(config)
    except errors as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    show(result)
    return 0

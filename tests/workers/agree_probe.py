"""collective.agree on 2 processes: rank 1 fails a check that every rank makes; both ranks must raise the same
error and it must be printed once."""

import sys

import torch.distributed as dist

from colossal_shear.cli import report
from colossal_shear.train.distributed.collective import agree, fail
from colossal_shear.train.distributed.launch import launch

if __name__ == "__main__":
    launch()
    try:
        agree(dist.get_rank() != 1, "rank-1.pt is missing")
    except Exception as error:
        print(f"rank {dist.get_rank()} raised {type(error).__name__}", flush=True)
        report("agree_probe.py", fail(error))
        sys.exit(2)
    sys.exit(0)

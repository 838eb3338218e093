"""One stage of training under a ColossalAI Booster plugin.

    colossalai run --nproc_per_node N [--hostfile hostfile] train.py --pretrained MODEL --dataset DATA ...
    torchrun --nproc_per_node N train.py ...          (also: plain `python train.py` for one process)

Every option is listed by `python train.py --help` and in docs/cli.md; --config takes a YAML file of them.
The work is colossal_shear.train.trainer.train (docs/architecture.md: how a run flows through the Trainer).
"""

import sys

from colossal_shear import cli
from colossal_shear.train.trainer import train

if __name__ == "__main__":
    sys.exit(cli.run("train.py", train, lambda result: None, description=__doc__))

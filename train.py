"""One stage of training under a ColossalAI Booster plugin.

    colossalai run --nproc_per_node N [--hostfile hostfile] train.py --pretrained MODEL --dataset DATA ...
    torchrun --nproc_per_node N train.py ...          (also: plain `python train.py` for one process)

Every flag is documented in the README and by `python train.py --help`; --config takes a YAML file of them.
"""

import sys
import warnings

from colossal_shear.train.config import parse_config
from colossal_shear.data.prepared import DatasetMismatch
from colossal_shear.train.loop import TrainingError, train
from colossal_shear.train.plugins import PluginError

if __name__ == "__main__":
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    cfg = parse_config(description=__doc__)
    try:
        train(cfg)
    except (TrainingError, PluginError, DatasetMismatch, FileNotFoundError, FileExistsError) as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        sys.exit(2)

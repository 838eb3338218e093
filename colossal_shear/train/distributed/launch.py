"""Joining the process group: the launcher's (colossalai run / torchrun) environment, the network interface, the
timeout, and the colossalai compat patches."""

from __future__ import annotations

import os

from colossal_shear.train.distributed.plugins import device_type


def launch(seed: int = 42) -> None:
    """Join the process group the launcher (colossalai run / torchrun) describes: nccl on GPU, gloo on CPU."""
    import colossalai

    from colossal_shear.core import compat

    compat.install()
    if "RANK" not in os.environ:  # a plain `python train.py`: a world of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    _prepare_network()
    colossalai.launch_from_torch(backend="nccl" if device_type() == "cuda" else "gloo", seed=seed, verbose=False)

    from colossalai.logging import get_dist_logger

    get_dist_logger().set_level("WARNING")  # its INFO lines about checkpoint shards drown the run's own log


def _prepare_network() -> None:
    """gloo/NCCL bind to the interface that reaches MASTER_ADDR, not to what the host name resolves to (often
    loopback), and wait on peers for COLOSSAL_SHEAR_DIST_TIMEOUT when set: see colossal_shear.train.network.
    An unresolvable or unreachable MASTER_ADDR stops here, in one line."""
    from colossal_shear.train.distributed import network

    network.configure()
    timeout = network.dist_timeout()
    if timeout is not None:  # colossalai.launch passes no timeout: torch's default applies to every group it makes
        import torch.distributed.distributed_c10d as c10d

        c10d.default_pg_timeout = c10d.default_pg_nccl_timeout = timeout


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

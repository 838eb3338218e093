"""Training: parallel configuration and plugin factory, optimiser, loop, schedule, checkpoints, metrics, logging."""

"""The science in plain PyTorch: schedules, networks, preconditioning, losses, samplers, oracles, data, training."""

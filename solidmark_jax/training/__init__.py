"""Train state, the sharded train step, checkpoints and the loop (training.loop.train)."""

"""Training: the config checks, the setup a config describes, Orbax checkpoints, the loop."""

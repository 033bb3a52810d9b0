"""Running a model with a plan: prefill (one program or segments), generation, cost, and
the public `Pipeline`."""

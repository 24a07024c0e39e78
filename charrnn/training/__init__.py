"""Training: the trainer (truncated BPTT, schedule, resume, signals), evaluation, distributed runs, callbacks."""

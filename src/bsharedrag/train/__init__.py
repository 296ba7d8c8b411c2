"""Training: the one training loop, continual pre-training, hard-negative mining, and the contrastive,
answer and joint objectives. A trainer takes its own settings section, never the whole `Config`.

Only `pipeline` imports this package; it imports `model/` and the base modules.
"""

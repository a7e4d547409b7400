"""Training: the Trainer (trainer.py) and the EMA of weights (ema.py)."""

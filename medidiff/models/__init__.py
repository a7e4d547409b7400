"""Models: U-Net presets (unet.py), checkpoint files (checkpoint.py), the one loaded-model object (loaded.py), shipped weights (pretrained.py)."""

"""medidiff.models.unet."""

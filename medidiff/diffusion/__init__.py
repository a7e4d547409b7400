"""medidiff.diffusion.core."""

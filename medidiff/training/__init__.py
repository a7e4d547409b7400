"""medidiff.training.trainer."""

"""medidiff.viz."""

"""medidiff.runtime."""

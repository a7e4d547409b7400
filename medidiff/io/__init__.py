"""medidiff.io.volume."""

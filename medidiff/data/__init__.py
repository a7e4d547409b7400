"""medidiff.data.datasets."""

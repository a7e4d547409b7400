"""medidiff.cli.main."""

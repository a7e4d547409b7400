"""medidiff.anomaly.detector."""

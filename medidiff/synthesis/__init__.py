"""medidiff.synthesis.synthesizer."""

"""Synthesis: the Synthesizer (synthesizer.py), dataset folders and manifests (folder.py), metrics (metrics.py, frechet.py)."""

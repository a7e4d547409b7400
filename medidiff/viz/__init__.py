"""Visualisation: figures, overlays and the demo's HTML report.

- :mod:`medidiff.viz.display`: shared panel drawing (one display orientation, from
  :mod:`medidiff.io.images`, which also writes the PNGs);
- :mod:`medidiff.viz.overlay`: anomaly-result montages (input, reconstruction, map, contours);
- :mod:`medidiff.viz.figures`: the "how it works" strips (forward, reverse, anomaly);
- :mod:`medidiff.viz.curves`: training-loss curves;
- :mod:`medidiff.viz.report`: the demo report, rendered from ``templates/`` with jinja2.

Figures are :class:`matplotlib.figure.Figure` objects on an Agg canvas: nothing here imports
pyplot or switches matplotlib's backend.
"""

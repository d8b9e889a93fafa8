"""Decide: scores -> OK/NG verdict with regions in frame pixels, and what the operator sees of
a reject (heat-map overlays, the reject archive)."""

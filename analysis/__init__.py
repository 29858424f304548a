"""Paper figures and tables regenerated from the results database (see analysis/registry.py)."""

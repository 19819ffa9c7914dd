"""The demo pipeline: tiny local assets and real data from PyPI packages."""

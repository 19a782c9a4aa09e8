"""Importers from annotation and SFT sources into canonical records (see README.md).

``align import SOURCE INPUT... --out OUTPUT`` calls :func:`data_tools.cli.main`.
"""

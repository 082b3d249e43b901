"""Experiment configs: each study file defines ``get_config(arg)`` (see ``common.py``)."""

"""Putting Serf where a model's activations are: the walk over modules, the site finders (module,
norm-act, attribute, functional, string, run-time), the decisions (gates, families, include/
exclude, positivity), the report a converted model carries, and Serf's registration as "serf"
in timm and transformers.

Imports nothing on its own: ``import serfswap`` loads :mod:`.registration` (torch-free) from here.
"""

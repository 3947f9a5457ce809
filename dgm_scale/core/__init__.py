"""The bottom layer: errors, atomic file writes, logger helpers, checkpoint writing, user imports.

Everything else may import from here; nothing here imports another dgm_scale package.
"""

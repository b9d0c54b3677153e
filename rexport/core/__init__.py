"""The base layer: errors, atomic files and hashes, preprocessing, environment facts.

It imports nothing else of rexport, so models, calibration and pipeline can all use it.
"""

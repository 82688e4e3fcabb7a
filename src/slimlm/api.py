"""The Python API; every CLI command is a thin wrapper over one function here.

    import slimlm.api as slim
    report = slim.inspect("path/or/catalog-name")

Each area re-exports its entry points below (one section per area).
"""

"""uwrt runtime: bundle loading, featurization, encoder and tree stages, policy, pipeline, CLI."""
__version__ = "0.1.0"

"""Model versions: the worker of one version, the registry of versions, the repository control."""

"""Speaker models: manifests, verified fetching of weights, and loaders behind one interface."""

"""The voxauth service: gRPC edge, verification policy, storage, audit, configuration, CLI."""

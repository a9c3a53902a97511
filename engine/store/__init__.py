"""The engine store: artifact keys, fingerprints, weight maps, shape profiles, build locks, publish and look-up."""

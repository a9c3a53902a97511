"""Pieces every stage uses: failure classes, device faults, element types, logs, timers, downloads, names."""

"""TensorRT backend: the runtime module, loaded engines and their shape slots, the runner,
and finding and loading engines in the store."""

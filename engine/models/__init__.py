"""Model families: components, specs and prompt encoding per family, the built-in tiny models,
ControlNets, and loading a model folder."""

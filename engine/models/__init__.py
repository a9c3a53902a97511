"""Model families: what each has (components, specs, prompt encoding), the built-in tiny models, ControlNets, and loading a model folder."""

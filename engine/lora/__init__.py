"""LoRA per request: files from the request, low-rank factors from diffusers' loaders, and the
weight patch (base + sum of scale x delta) each backend applies to its own copy of the weights."""

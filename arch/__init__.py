"""nn.Modules: the language model and its pluggable blocks (see arch.registry)."""

"""Reference models: plain nn.Modules with config dataclasses and named flavours.

No torch.distributed in here. `get(name, **overrides)` returns a config, `build(config)` the
module, `example_inputs(config, batch)` seeded synthetic inputs.
"""
from .registry import (Family, Flavour, apply_overrides, build, example_inputs, families,
                       family_of, flavours, get)

__all__ = ["Family", "Flavour", "apply_overrides", "build", "example_inputs", "families",
           "family_of", "flavours", "get"]

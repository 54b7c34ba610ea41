"""workbench: predict, simulate and measure parallel training plans (see DESIGN.md)."""

__version__ = "0.1.0"

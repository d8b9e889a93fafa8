"""edge-agent: PatchCore visual inspection for factory camera lines."""

__version__ = "0.1.0"

"""Hooks that stream per-layer statistics (`hooks`) and pure metric functions (`metrics`)."""

"""Applications built on the generic engine and API: each knows one world (``apps.vsp``: FrozenLake planning)."""

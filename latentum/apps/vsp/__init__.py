"""Visual spatial planning on FrozenLake maps (VSP) with latent visual thoughts: the planner, imagined move
sequences, the evaluation and the demo. ``plan(model, image)`` takes a ``LatentUM`` and a map image."""

from latentum.apps.vsp.planner import (
    Plan,
    board_canvas,
    falls_at,
    imagine,
    imagine_batch,
    plan,
    plan_batch,
)

__all__ = ["Plan", "board_canvas", "falls_at", "imagine", "imagine_batch", "plan", "plan_batch"]

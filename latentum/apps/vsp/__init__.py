"""Visual spatial planning on FrozenLake maps (VSP) with latent visual thoughts: the planning loops (``planner``),
their public entry points (``entry``), the evaluation and the demo. ``plan(model, image)`` takes a ``LatentUM``
and a map image."""

from latentum.apps.vsp.entry import board_canvas, imagine, imagine_batch, plan, plan_batch
from latentum.apps.vsp.planner import Plan, falls_at

__all__ = ["Plan", "board_canvas", "falls_at", "imagine", "imagine_batch", "plan", "plan_batch"]

"""FrozenLake, the VSP benchmark's world: maps and the rules (``lake``), the gymnasium and classic gym renders
(``render``), a pixel oracle (``oracle``) and the VSP task samples (``tasks``)."""

from latentum.worlds.frozenlake.lake import (
    ACTIONS,
    LakeMap,
    Pos,
    Rollout,
    displace,
    generate_map,
    move,
    shortest_plan,
    simulate,
)
from latentum.worlds.frozenlake.oracle import LakeState, read_canvas, read_map, state_of
from latentum.worlds.frozenlake.render import ENV_CELL_PX, STYLES, render, render_canvas, render_env, to_canvas

__all__ = ["ACTIONS", "ENV_CELL_PX", "STYLES", "LakeMap", "LakeState", "Pos", "Rollout", "displace", "generate_map",
           "move", "read_canvas", "read_map", "render", "render_canvas", "render_env", "shortest_plan", "simulate",
           "state_of", "to_canvas"]

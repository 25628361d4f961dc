"""FrozenLake, the VSP benchmark's world: maps, the gymnasium and classic gym renders, the rules, a pixel oracle
(``lake``) and the VSP task samples (``tasks``)."""

from latentum.worlds.frozenlake.lake import (
    ACTIONS,
    ENV_CELL_PX,
    STYLES,
    LakeMap,
    LakeState,
    Rollout,
    displace,
    generate_map,
    move,
    read_canvas,
    read_map,
    render,
    render_canvas,
    render_env,
    shortest_plan,
    simulate,
    state_of,
    to_canvas,
)

__all__ = ["ACTIONS", "ENV_CELL_PX", "STYLES", "LakeMap", "LakeState", "Rollout", "displace", "generate_map", "move",
           "read_canvas", "read_map", "render", "render_canvas", "render_env", "shortest_plan", "simulate",
           "state_of", "to_canvas"]

"""The built-in data worlds, apart from the generic engine: each is its own package (maps or scenes, rendering,
an exact pixel oracle, task samples); ``worlds.registry`` maps task names to their samplers."""

"""Where shard replicas run: in this process (``local``) or as Ray actors (``ray_actors``),
behind the small protocol of ``base``."""

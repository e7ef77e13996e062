"""videolm: VideoPoet in JAX/Flax."""
from flax import config as _flax_config

# Parameters are placed by videolm.parallel (eval_shape -> shardings -> jit with out_shardings),
# so modules carrying logical axis names can also be built plainly on one device.
_flax_config.update("flax_always_shard_variable", False)

__version__ = "0.1.0"

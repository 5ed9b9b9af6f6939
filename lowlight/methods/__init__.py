"""Methods register themselves on import; importing this package registers them all."""

from lowlight.methods import adaptbir, condrefine, darkdiff, exposure_diffusion, regression, sd_baselines  # noqa: F401 - registration side effect
from lowlight.methods.base import REGISTRY, EnhanceOptions, Method, build_method, method_class, parse_options

__all__ = ["REGISTRY", "EnhanceOptions", "Method", "build_method", "method_class", "parse_options"]

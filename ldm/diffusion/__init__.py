"""The diffusion math, defined once: `ldm.diffusion.process` (schedules, alpha_bar, SNR, noising, targets,
x0/eps/v conversions, loss weights, timestep sampling). `from ldm import diffusion; diffusion.add_noise(...)`."""
from ldm.diffusion.process import *  # noqa: F401,F403
from ldm.diffusion.process import __all__  # noqa: F401

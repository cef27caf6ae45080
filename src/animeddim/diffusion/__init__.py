"""The diffusion maths, apart from the network (which never sees the schedule).

- `schedule`: signal/noise rates of diffusion time, log-SNR and its inverse, the forward
  process;
- `samplers`: the reverse-process samplers (plain functions taking a time grid and passing
  `cond` through) and their one registry, `SAMPLERS`;
- `objectives`: what the network predicts (eps or v) and how training weighs its error
  (MAE or MSE, min-SNR); the conversion that gives every sampler eps;
- `generation`: seeded, batch-size-independent image generation with any sampler;
- `inversion`: DDIM inversion, spherical interpolation of noises, PSNR.
"""

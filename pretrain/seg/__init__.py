"""Full-resolution 3D segmentation on the platform's engine (objective ``seg3d``), nnU-Net-like:
patches with foreground oversampling, MONAI ``DynUNet`` with deep supervision or a diffusion
backbone's U-Net (encoder and bottleneck initialised from a published backbone), Dice + CE, and
sliding-window inference with Gaussian weighting on each study's native grid. See ``docs/segmentation.md``.
"""

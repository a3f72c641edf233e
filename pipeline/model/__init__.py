"""The model wing: the diffusion maths (GaussianDiffusion, losses, respacing) and the network
(the paper's U-Net, its weight files, diffusers conversion). Imports only the base modules and
torch: no Ray, MLflow or DVC."""

"""The evaluation wing: one variant's evaluation and its outputs, FID/IS (torch-fidelity,
Inception, the feature network), the NLL bound, rate-distortion, reconstructions and
interpolation, their figures. Imports sampling and every wing below it; never training."""

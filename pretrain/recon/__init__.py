"""MRI reconstruction: masks, coil handling, transforms, fastMRI metrics, the recon objective, evaluation."""

"""Training losses and the metrics that double as losses: SSIM, and more as they land."""

"""Where initial weights come from: published weights (names, checksums, download), foreign
checkpoints (mmdetection, torchvision) and fine-tuning from a centerpoint checkpoint (`model.init_from`)."""

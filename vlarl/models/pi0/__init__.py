"""pi0 (Physical Intelligence) in LeRobot's and openpi's PyTorch layouts, on transformers' PI0 model."""

"""pi0.5 (Physical Intelligence; LeRobot's and openpi's PyTorch folders) as a vlarl flow family."""

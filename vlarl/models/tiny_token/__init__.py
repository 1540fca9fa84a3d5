"""The tiny token VLA family: vlarl's own OpenVLA-style token policy, built from config in seconds."""

"""The tiny flow VLA family: the tiny token VLA's prefix plus a pi0-style action expert."""

"""SmolVLA (Hugging Face; LeRobot folders) as a vlarl flow family."""

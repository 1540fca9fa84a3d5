"""The observation and action layout every environment and policy agrees on (LIBERO's).

It sits at the bottom of the package so environments, models and datasets can all read it without
importing each other.
"""

ACTION_DIM = 7  # xyz translation, xyz rotation, gripper (LIBERO's layout)
PROPRIO_DIM = 8  # eef position (3), axis-angle (3), gripper joints (2)

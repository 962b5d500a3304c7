"""Pure tensor maths (no configs, no models): losses and estimators with shapes in their docstrings."""

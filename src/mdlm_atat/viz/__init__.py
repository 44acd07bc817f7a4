"""Plots and pages a person looks at (DESIGN 1): the sampling trace, later the run report."""

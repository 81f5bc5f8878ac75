"""pytest plugin (built by the regression-checks issue)."""

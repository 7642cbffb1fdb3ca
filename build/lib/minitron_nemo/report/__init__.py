"""Tables and PNG plots of a run."""

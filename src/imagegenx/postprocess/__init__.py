"""postprocess room."""

"""Tasks: what a modality needs from the generic train driver (data, model, report)."""

"""What the page draws: heatmaps and stats of tensors, one element followed back."""

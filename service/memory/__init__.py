"""What memory is used, by whom, and getting it back."""

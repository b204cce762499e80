"""placeholder: filled by the certified-training work (issue 7)."""

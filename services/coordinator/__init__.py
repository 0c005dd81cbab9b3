"""The coordinator: the EFT engine over model workers (DESIGN.md section 3)."""

"""The gateway: the public EFTService. Validates requests once, renders prompts per model,
submits to the coordinator's scheduler, and turns token chunks into text."""

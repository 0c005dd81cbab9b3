"""The demo model family: a tiny world of made-up facts, four base/tuned models and a
refusing delta, trained on the CPU in minutes, saved as Hugging Face folders.

It shows the EFT paper's headline result in miniature: a large base plus the small chat
delta answers in the chat format with the large model's knowledge. See FAMILY-NOTES.
"""

"""The end-to-end demo: its own base model, preference data and evaluation, built offline."""

"""Hugging Face checkpoints: `families.py` holds each model_type's tensor table and config
mapping, `weights.py` streams tensors through them (import, export, a run started from a
save_pretrained directory). No command line here: `megajax.convert` is the command."""

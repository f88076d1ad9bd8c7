"""HuggingFace interop: checkpoints in and out as safetensors, and the config mapping.

hf          import_hf / export_hf: the parameter renaming tables of every family
hf_config   HF config.json <-> the model section
export      a training run (its newest good checkpoint) -> an HF folder with its tokenizer
"""

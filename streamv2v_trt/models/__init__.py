"""Model architecture configs shipped in the package (their presets: streamv2v_trt/presets.py), the loader, LoRA
fusing and the CLIP tokenizer.

Import the modules themselves (`models.loader`, `models.lora`, ...): the loader pulls in diffusers and transformers,
which a user of compiled engines should not pay for on `import streamv2v_trt`.
"""

"""Model presets (architecture configs shipped in the package), the loader, LoRA fusing and the CLIP tokenizer.

Import the modules themselves (`models.loader`, `models.lora`, ...): the loader pulls in diffusers and transformers,
which a user of compiled engines should not pay for on `import streamv2v_trt`.
"""

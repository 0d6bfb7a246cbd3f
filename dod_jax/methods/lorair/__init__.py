"""LoRA-IR (Ai, Huang, He 2024; ../shared/LORA_IR.md): NAFNet with DAM heads and routed
low-rank experts on every convolution, routed by a CLIP degradation router. So far: the
converter of the authors' IR weights (official.py)."""

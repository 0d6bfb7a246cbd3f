"""LoRA-IR (Ai, Huang, He 2024; ../shared/LORA_IR.md) as a method: NAFNet with DAM heads and
routed low-rank experts on every convolution (dod_jax.models.nafnet, dod_jax.adapters), routed
by a CLIP degradation router (router.py); method.py puts it behind dod_jax.methods' interface,
official.py and convert.py read the authors' released weights."""

"""Med3DQwen model: DCFormer encoder, MLP-Mixer projector, slice fusion (SSA/MSSA) and a Qwen2 decoder."""

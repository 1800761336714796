"""genserver: an SGLang-compatible generation server for HF causal LMs (the CPU and test stand-in for SGLang)."""

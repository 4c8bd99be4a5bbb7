"""LLM providers for LLM-derived side information (LLMRec), behind one small interface, cached on disk."""

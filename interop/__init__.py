"""Our checkpoints in other tools' formats: Hugging Face (hf.py) and GGUF for llama.cpp
(gguf.py); convert.py is their command line."""

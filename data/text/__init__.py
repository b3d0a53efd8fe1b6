"""Text as the models see it: the byte-level BPE tokenizer (tokenizer.py), the chat template
and the record formats it reads (chat.py), and the tokenizer as a Hugging Face
tokenizer.json (hf_tokenizer.py). Imports only the shared leaves data.files and
data.parallel."""

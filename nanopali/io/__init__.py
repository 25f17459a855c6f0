"""Files on disk: checkpoints in the Hugging Face safetensors layout, and JSON reading with errors that name the file."""
